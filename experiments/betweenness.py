"""Train a betweenness ranker: `python -m experiments.betweenness --config=experiments/configs/betweenness.py:undirected --workdir=runs/betweenness`.

The trainer is `experiments/trainers/betweenness.py`; the variants are in the config file.
"""
from experiments.trainers import entry

if __name__ == "__main__":
  entry.main("betweenness", "experiments/configs/betweenness.py:undirected", "runs/betweenness")
