r"""Generate and label a betweenness config's graphs ahead of training.

    python -m experiments.betweenness_data --config=experiments/configs/betweenness.py:undirected

Writes one `.npz` per graph (its arcs and exact betweenness, igraph's Brandes) under
`data.path/train` and `data.path/val`, showing progress graph by graph. Files appear
whole (atomic renames), so an interrupted run resumes where it stopped; training reuses
them (and makes any that are missing itself). Labels need igraph: `pip install -e
'.[betweenness]'`.
"""
from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/betweenness.py:undirected", "Betweenness config.")


def main(argv):
  del argv
  from experiments.trainers import betweenness  # noqa: PLC0415
  config = _CONFIG.value
  betweenness.validate(config)
  for split in ("train", "val"):
    items = betweenness.load_split(config, split)
    nodes = sum(p.graph.num_nodes for p in items)
    print(f"{split}: {len(items)} graphs, {nodes:,} nodes, in {config.data.path}/{split}")


if __name__ == "__main__":
  app.run(main)
