"""Train CosmoFlow: `python -m experiments.cosmoflow --config=experiments/configs/cosmoflow.py:demo --workdir=runs/demo`.

The trainer is `experiments/trainers/cosmoflow.py`.
"""
from experiments.trainers import entry

if __name__ == "__main__":
  entry.main("cosmoflow", "experiments/configs/cosmoflow.py:demo", "runs/cosmoflow")
