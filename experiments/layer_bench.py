r"""Per-layer benchmarks: GEMMs, convolutions, a transformer block; rooflines per device.

    python -m experiments.layer_bench --config=experiments/configs/layer_bench.py:cpu \
        --workdir=runs/layer_bench

Writes `<workdir>/results.csv` (DeepBench's columns and ours), `results.md` (tables,
including each layer's roofline time on the A64FX and the H100) and
`roofline_<platform>.png`, and prints the tables. See `sdl/bench/`.
"""
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/layer_bench.py:cpu", "Benchmark config (and :variant).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/layer_bench", "Where results go.")


def main(argv):
  del argv
  from sdl.bench import suite  # noqa: PLC0415 (jax starts here)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  print(suite.run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
