"""Train on the 8x8 digits: `python -m experiments.digits --config=experiments/configs/digits.py:autoencoder_kfac --workdir=runs/digits`.

The trainer is `experiments/trainers/digits.py`.
"""
from experiments.trainers import entry

if __name__ == "__main__":
  entry.main("digits", "experiments/configs/digits.py:autoencoder", "runs/digits")
