"""Entry points: `python -m experiments.<name> --config=experiments/configs/<name>.py:<variant>`.

`import sdl` comes first, before anything loads NumPy, so that its process settings
(`sdl/blas_threads.py`, `sdl/xla_flags.py`) take effect in every entry point.
"""
import sdl  # noqa: F401
