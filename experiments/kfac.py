"""K-FAC against tuned SGD-momentum and Adam (see experiments/configs/kfac.py)."""
from absl import app, flags
from ml_collections import config_flags

from experiments.trainers import kfac_compare

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/kfac.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/kfac", "where runs, summary and plots go")


def main(argv):
  del argv
  kfac_compare.compare(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
