"""Betweenness training data: generated graph families, labelled exactly, cached per graph.

Families (`FAMILIES`; networkx generators, seeded):
  undirected  powerlaw_cluster (Holme-Kim, m = 4, p = 0.05: DrBC's and ABCDE's training
              and test graphs), erdos_renyi (mean degree 8), gaussian_partition
              (communities of ~n/20, dense inside, sparse between), geometric (random
              geometric graphs on the unit square at mean degree ~10: high diameter, the
              road-like case where earlier GNNs fail)
  directed    scale_free (Bollobás et al.'s directed preferential attachment, as
              networkx's `scale_free_graph`, collapsed to a simple digraph), erdos_renyi
              (directed, mean out-degree 4), gaussian_partition (directed)

`write_graphs(directory, family, sizes, seeds)` generates each graph, labels it with
`sdl.data.graphs.exact_betweenness`, and writes `<family>-<nodes>-<seed>.npz` (arcs,
labels) atomically: an interrupted run leaves whole files only, and a rerun skips them,
so generation resumes graph by graph. `load(path)` reads one back.
"""
import dataclasses
import os
import time

import numpy as np

from sdl import console
from sdl.data import graphs

UNDIRECTED = ("powerlaw_cluster", "erdos_renyi", "gaussian_partition", "geometric")
DIRECTED = ("scale_free", "erdos_renyi", "gaussian_partition")
FAMILIES = {False: UNDIRECTED, True: DIRECTED}


def generate(family: str, num_nodes: int, seed: int, directed: bool) -> graphs.Graph:
  """One graph of `family` with `num_nodes` nodes (node ids 0 .. n-1)."""
  import networkx as nx  # noqa: PLC0415  (only to make data)
  n = num_nodes
  if family not in FAMILIES[directed]:
    kind = "directed" if directed else "undirected"
    raise ValueError(f"no {kind} graph family {family!r}: choose one of {FAMILIES[directed]}")
  if family == "powerlaw_cluster":
    g = nx.powerlaw_cluster_graph(n, 4, 0.05, seed=seed)
  elif family == "erdos_renyi":
    g = nx.fast_gnp_random_graph(n, (4 if directed else 8) / max(n - 1, 1), seed=seed,
                                 directed=directed)
  elif family == "gaussian_partition":
    size = max(n // 20, 2)
    g = nx.gaussian_random_partition_graph(n, size, size / 4, min(1.0, 6 / size),
                                           1.5 / n, directed=directed, seed=seed)
  elif family == "geometric":
    g = nx.random_geometric_graph(n, float(np.sqrt(10 / (np.pi * n))), seed=seed)
  else:  # scale_free
    g = nx.scale_free_graph(n, seed=seed)
  edges = np.array([(u, v) for u, v in g.edges()], np.int64).reshape(-1, 2)
  return graphs.from_edges(n, edges, directed)[0]


@dataclasses.dataclass(frozen=True)
class Labelled:
  graph: graphs.Graph
  betweenness: np.ndarray  # float64 [nodes], unnormalised
  name: str


def file_name(family: str, num_nodes: int, seed: int) -> str:
  return f"{family}-{num_nodes}-{seed}.npz"


def save(path: str, item: Labelled) -> None:
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  g = item.graph
  np.savez(tmp, num_nodes=g.num_nodes, senders=g.senders, receivers=g.receivers,
           directed=g.directed, betweenness=item.betweenness)
  os.replace(tmp, path)


def load(path: str) -> Labelled:
  with np.load(path) as f:
    graph = graphs.Graph(int(f["num_nodes"]), f["senders"], f["receivers"], bool(f["directed"]))
    return Labelled(graph, f["betweenness"], os.path.basename(path)[:-4])


def write_graphs(directory: str, families, sizes, seeds, directed: bool) -> list[str]:
  """Generate and label every (family, size, seed) not already in `directory`; returns
  all their paths, in order. Shows progress (graphs done, the last one's time)."""
  os.makedirs(directory, exist_ok=True)
  todo = [(f, n, s) for f in families for n in sizes for s in seeds]
  paths = []
  start = time.perf_counter()
  for i, (family, n, seed) in enumerate(todo, 1):
    path = os.path.join(directory, file_name(family, n, seed))
    paths.append(path)
    if not os.path.exists(path):
      t = time.perf_counter()
      graph = generate(family, n, seed, directed)
      save(path, Labelled(graph, graphs.exact_betweenness(graph), path))
      last = f"{family} n={n}: {time.perf_counter() - t:.1f} s"
    else:
      last = "cached"
    console.progress(f"labelling graphs: {i}/{len(todo)} ({last}; "
                     f"{time.perf_counter() - start:.0f} s)", final=i == len(todo))
  return paths
