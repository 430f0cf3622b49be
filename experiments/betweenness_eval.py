r"""Betweenness rankings against the exact labels on DrBC's protocol (reduced): the trained
model and the degree baseline, on fresh powerlaw-cluster graphs (m = 4, p = 0.05).

    python -m experiments.betweenness_eval [--checkpoint=DIR] [--sizes=5000,10000] \
        [--graphs=10] [--data=data/betweenness/eval]

For each size, `--graphs` graphs (seeds 20000 + i, never seen in training) are generated
and labelled exactly (cached in `--data`, resumable), ranked by each method, and scored:
Kendall tau-b and top-1/5/10 % accuracy, mean ± std over the graphs. The model's time is
features + scoring (compilation reported apart). Prints a markdown table.
"""
import time

import numpy as np
from absl import app, flags

from experiments.trainers.betweenness import SHIPPED

_CHECKPOINT = flags.DEFINE_string("checkpoint", SHIPPED, "Exported model directory.")
_SIZES = flags.DEFINE_list("sizes", ["5000", "10000"], "Graph sizes (nodes).")
_GRAPHS = flags.DEFINE_integer("graphs", 10, "Graphs per size.")
_DATA = flags.DEFINE_string("data", "data/betweenness/eval", "Labelled graph cache.")
_FAMILY = flags.DEFINE_string("family", "powerlaw_cluster", "Undirected graph family.")


def main(argv):
  del argv
  from experiments.trainers import betweenness as trainer  # noqa: PLC0415
  from sdl.data import betweenness as data  # noqa: PLC0415
  module, params, spec = trainer.load_exported(_CHECKPOINT.value)
  keys = ("kendall_tau", "top1", "top5", "top10")
  lines = [f"model: {_CHECKPOINT.value} (step {spec['step']}); family {_FAMILY.value}", "",
           "| nodes | method | Kendall tau | top-1 % | top-5 % | top-10 % | seconds |",
           "|---|---|---|---|---|---|---|"]
  for size in map(int, _SIZES.value):
    paths = data.write_graphs(f"{_DATA.value}/{_FAMILY.value}", [_FAMILY.value], [size],
                              range(20_000, 20_000 + _GRAPHS.value), directed=False)
    results = {"GNN": [], "degree": []}
    seconds = {"GNN": [], "degree": []}
    for path in paths:
      item = data.load(path)
      t = time.perf_counter()
      prepared = trainer.prepare(item)
      features_s = time.perf_counter() - t
      scores, timing = trainer.score_exported(module, params, prepared, False)
      seconds["GNN"].append(features_s + timing["score_s"])
      results["GNN"].append(trainer.metrics_of(scores, item.betweenness, False))
      t = time.perf_counter()
      degree = item.graph.out_degree().astype(float)
      seconds["degree"].append(time.perf_counter() - t)
      results["degree"].append(trainer.metrics_of(degree, item.betweenness, False))
    for method, runs in results.items():
      cells = [f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs]):.3f}"
               for k in keys]
      lines.append(f"| {size:,} | {method} | " + " | ".join(cells)
                   + f" | {np.median(seconds[method]):.3f} |")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
