"""Where K-FAC's step time goes (see experiments/trainers/kfac_profile.py).

    python -m experiments.kfac_profile --config=experiments/configs/kfac.py:digits_autoencoder \
        --out=runs/kfac_profile [--widths=64,128,256,512,1024,2048]

Prints a markdown table (also written to OUT/<experiment>.md) and a PNG with the amortised
breakdown and the inversion-cost-vs-width curve.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from experiments.trainers import kfac_profile

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/kfac.py")
_OUT = flags.DEFINE_string("out", "runs/kfac_profile", "directory for the table and the plot")
_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024", "2048"],
                            "factor widths for the inversion-cost curve")
_RUNS = flags.DEFINE_integer("runs", 10, "timed calls per part (median reported)")


def main(argv):
  del argv
  config = _CONFIG.value
  os.makedirs(_OUT.value, exist_ok=True)
  problem = kfac_profile.make_problem(config)
  parts = kfac_profile.step_parts(config, problem, runs=_RUNS.value)
  steps = kfac_profile.whole_steps(config, problem)
  scaling = kfac_profile.inversion_scaling(tuple(int(w) for w in _WIDTHS.value))
  base = os.path.join(_OUT.value, config.experiment)
  text = kfac_profile.report(config, parts, steps, scaling, base + ".png")
  with open(base + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
