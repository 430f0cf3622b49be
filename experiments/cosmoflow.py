"""Train CosmoFlow: `python -m experiments.cosmoflow --config=experiments/configs/cosmoflow.py:demo --workdir=runs/demo`."""
from absl import app, flags, logging
from ml_collections import config_flags

from sdl.parallel import ensure_cpu_devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/cosmoflow.py:demo", "Config file (and :variant).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/cosmoflow", "Checkpoints, metrics, plots.")


def main(argv):
  del argv
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  ensure_cpu_devices(config.mesh.cpu_devices)  # before JAX starts its backend
  from experiments.trainers import cosmoflow  # noqa: PLC0415 (jax-heavy, after the above)
  cosmoflow.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
