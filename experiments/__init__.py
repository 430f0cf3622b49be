"""Entry points: `python -m experiments.<name> --config=experiments/configs/<name>.py:<variant>`.

First thing, before anything loads NumPy or starts a thread, the package applies sdl's
CPU-process settings (`sdl.process.configure`: allocator, BLAS threads, XLA flags), so they
take effect in every entry point. `--config.process.configure=False` (or
`SDL_PROCESS_SETTINGS=0`) turns them off; the trainers write what was applied into the
run's `config.json`.
"""
from sdl import process as _process

PROCESS_SETTINGS = _process.configure(enabled=_process.enabled_by())
