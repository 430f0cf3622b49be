r"""Betweenness rankings against the exact labels on DrBC's protocol (reduced): the trained
model and the baselines, on fresh graphs never seen in training.

    python -m experiments.betweenness_eval [--checkpoint=DIR] [--sizes=5000,10000] \
        [--graphs=10] [--family=powerlaw_cluster] [--directed] \
        [--baselines=degree,kadabra_0.01,kadabra_0.005,estimate,rk,exact] \
        [--data=data/betweenness/eval]

For each size, `--graphs` graphs of `--family` (seeds 20000 + i) are generated and
labelled exactly (cached in `--data`, resumable), ranked by each method, and scored:
Kendall tau-b and top-1/5/10 % accuracy (directed graphs: also tau over the nodes of
nonzero betweenness), mean ± std over the graphs, and the median seconds per graph.

The methods:
  GNN            the model: features + scoring (its compile is reported apart)
  degree         out-degree (directed: in · out degree)
  kadabra_<eps>  networkit's KADABRA, error eps, probability 0.9 (undirected graphs only,
                 networkit#1039)
  estimate       networkit's EstimateBetweenness (Brandes-Pich pivots), 128 sources
  rk             networkit's ApproxBetweenness (Riondato-Kornaropoulos), eps 0.05,
                 probability 0.9 (at eps 0.01 it took 130 s a 10k-node graph here)
  exact          igraph's Brandes (the labels' own time)
networkit's methods run on every CPU of the machine and get the graph prebuilt; they
need `pip install -e '.[betweenness]'`. Prints a markdown table.
"""
import os
import time

import numpy as np
from absl import app, flags

from experiments.trainers.betweenness import SHIPPED

BASELINES = ("degree", "kadabra_0.01", "kadabra_0.005", "estimate", "rk", "exact")
_CHECKPOINT = flags.DEFINE_string("checkpoint", SHIPPED, "Exported model directory.")
_SIZES = flags.DEFINE_list("sizes", ["5000", "10000"], "Graph sizes (nodes).")
_GRAPHS = flags.DEFINE_integer("graphs", 10, "Graphs per size.")
_DATA = flags.DEFINE_string("data", "data/betweenness/eval", "Labelled graph cache.")
_FAMILY = flags.DEFINE_string("family", "powerlaw_cluster", "Graph family.")
_DIRECTED = flags.DEFINE_bool("directed", False, "Directed graphs (--family=scale_free).")
_BASELINES = flags.DEFINE_list("baselines", list(BASELINES), f"Of {', '.join(BASELINES)}.")


def networkit_graph(graph):
  import networkit as nk  # noqa: PLC0415
  edges = graph.edges().astype(np.uint64)
  return nk.GraphFromCoo((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                         n=graph.num_nodes, directed=graph.directed, weighted=False)


def baseline(method: str, item, nk_graph) -> np.ndarray:
  """One baseline's scores of `item`'s nodes."""
  g = item.graph
  if method == "degree":
    return (g.out_degree() * (g.in_degree() if g.directed else 1)).astype(float)
  if method == "exact":
    from sdl.data import graphs  # noqa: PLC0415
    return graphs.exact_betweenness(g)
  import networkit as nk  # noqa: PLC0415
  if method.startswith("kadabra_"):
    algorithm = nk.centrality.KadabraBetweenness(nk_graph, float(method[8:]), 0.1)
  elif method == "estimate":
    algorithm = nk.centrality.EstimateBetweenness(nk_graph, 128, False, True)
  else:  # rk
    algorithm = nk.centrality.ApproxBetweenness(nk_graph, 0.05, 0.1)
  algorithm.run()
  return np.asarray(algorithm.scores(), np.float64)


def main(argv):
  del argv
  from experiments.trainers import betweenness as trainer  # noqa: PLC0415
  from sdl.data import betweenness as data  # noqa: PLC0415
  directed = _DIRECTED.value
  unknown = sorted(set(_BASELINES.value) - set(BASELINES))
  if unknown:
    raise app.UsageError(f"--baselines: unknown {unknown}; choose from {BASELINES}")
  methods = ["GNN", *[m for m in _BASELINES.value
                      if not (directed and m.startswith("kadabra"))]]
  if any(m not in ("GNN", "degree", "exact") for m in methods):
    import networkit as nk  # noqa: PLC0415
    nk.setNumberOfThreads(len(os.sched_getaffinity(0)))
  module, params, spec = trainer.load_exported(_CHECKPOINT.value)
  keys = ["kendall_tau", *(["kendall_tau_nonzero"] if directed else []), "top1", "top5",
          "top10"]
  header = ["nodes", "method", "Kendall tau", *(["tau, nonzero"] if directed else []),
            "top-1 %", "top-5 %", "top-10 %", "seconds"]
  lines = [f"model: {_CHECKPOINT.value} (step {spec['step']}); family {_FAMILY.value}"
           f"{' (directed)' if directed else ''}", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  compile_s = []
  for size in map(int, _SIZES.value):
    paths = data.write_graphs(f"{_DATA.value}/{_FAMILY.value}", [_FAMILY.value], [size],
                              range(20_000, 20_000 + _GRAPHS.value), directed=directed)
    results = {m: [] for m in methods}
    seconds = {m: [] for m in methods}
    for path in paths:
      item = data.load(path)
      nk_graph = networkit_graph(item.graph) if any(
          m not in ("GNN", "degree", "exact") for m in methods) else None
      for method in methods:
        t = time.perf_counter()
        if method == "GNN":
          prepared = trainer.prepare(item, spec.get("pivots", 0))
          features_s = time.perf_counter() - t
          scores, timing = trainer.score_exported(module, params, prepared, directed)
          compile_s.append(timing["compile_s"])
          took = features_s + timing["score_s"]
        else:
          scores = baseline(method, item, nk_graph)
          took = time.perf_counter() - t
        seconds[method].append(took)
        results[method].append(trainer.metrics_of(scores, item.betweenness, directed))
    for method, runs in results.items():
      cells = [f"{np.nanmean([r[k] for r in runs]):.3f} ± {np.nanstd([r[k] for r in runs]):.3f}"
               for k in keys]
      lines.append(f"| {size:,} | {method} | " + " | ".join(cells)
                   + f" | {np.median(seconds[method]):.3f} |")
    print("\n".join(lines[-len(results):]), flush=True)
  lines.append(f"\nGNN compile: {np.median(compile_s):.2f} s a graph size (median)")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
