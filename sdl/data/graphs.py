"""Graphs for betweenness ranking: arcs as integer arrays, exact labels, the nodes that no
shortest path can pass through, and the size-independent node features.

A `Graph` holds arcs (`senders[i] -> receivers[i]`, int32). An undirected graph holds each
edge as two arcs, so that message passing treats both kinds alike; `directed` says which
it is. Self-loops and repeated edges never enter (`from_edges` drops and counts them).

Exact betweenness comes from igraph (`exact_betweenness`): its C core (Brandes'
algorithm) took 8-10 s on a 10k-node Barabási-Albert graph on the 2-core VM, against
15-48 s for networkit and 439 s for networkx (issue 24's measurements); it is
maintained, ships wheels for x86-64 and aarch64, and counts a directed graph's ordered
pairs and an undirected graph's unordered pairs as networkx does. networkx is the
reference in the tests. igraph is needed only to make labels (`pip install -e
'.[betweenness]'`); ranking a graph with a trained model needs none of it.
"""
import dataclasses
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np


@dataclasses.dataclass(frozen=True)
class Graph:
  num_nodes: int
  senders: np.ndarray    # int32 [arcs]
  receivers: np.ndarray  # int32 [arcs]
  directed: bool

  @property
  def num_arcs(self) -> int:
    return len(self.senders)

  def in_degree(self) -> np.ndarray:
    return np.bincount(self.receivers, minlength=self.num_nodes)

  def out_degree(self) -> np.ndarray:
    return np.bincount(self.senders, minlength=self.num_nodes)

  def edges(self) -> np.ndarray:
    """[edges, 2]: the arcs of a directed graph; each undirected edge once (u < v)."""
    pairs = np.stack([self.senders, self.receivers], 1)
    return pairs if self.directed else pairs[pairs[:, 0] < pairs[:, 1]]


@dataclasses.dataclass(frozen=True)
class Cleaned:
  """What `from_edges` dropped."""
  self_loops: int
  duplicates: int


def from_edges(num_nodes: int, edges: np.ndarray, directed: bool) -> tuple[Graph, Cleaned]:
  """A `Graph` from `[edges, 2]` node indices in `[0, num_nodes)`, without self-loops and
  repeats (for an undirected graph, u-v and v-u are the same edge)."""
  edges = np.asarray(edges, np.int64).reshape(-1, 2)
  if edges.size and (edges.min() < 0 or edges.max() >= num_nodes):
    raise ValueError(f"edge endpoints must lie in [0, {num_nodes})")
  loops = edges[:, 0] == edges[:, 1]
  edges = edges[~loops]
  if not directed:
    edges = np.sort(edges, axis=1)
  key = edges[:, 0] * num_nodes + edges[:, 1]
  if not directed:  # both arcs of each edge
    key = np.concatenate([key, edges[:, 1] * num_nodes + edges[:, 0]])
  # One sort of the arcs' keys, then repeats dropped: NumPy 2's hash-based `unique` took
  # 2.3 s on a 4M-edge list where this takes 0.7 s.
  key.sort()
  if len(key):
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
  duplicates = len(edges) - len(key) // (1 if directed else 2)
  u, v = np.divmod(key, num_nodes)
  graph = Graph(int(num_nodes), u.astype(np.int32), v.astype(np.int32), directed)
  return graph, Cleaned(int(loops.sum()), int(duplicates))


# Below this many nodes one process labels a graph faster than starting workers does.
PARALLEL_LABELS_FROM = 20_000


def exact_betweenness(graph: Graph, workers: int | None = None) -> np.ndarray:
  """Unnormalised betweenness of every node (float64), by igraph's Brandes algorithm:
  for a directed graph over ordered pairs (s, t), for an undirected one over unordered
  pairs, as `networkx.betweenness_centrality(normalized=False)`.

  Brandes' sum runs over source nodes, so `workers` processes (default: one per CPU this
  process may use, from `PARALLEL_LABELS_FROM` nodes) each sum the pairs from their share
  of the sources (igraph's subset betweenness) and the shares add up to the whole. igraph
  runs one thread, so the workers are what use a many-core node's other cores."""
  try:
    import igraph  # noqa: PLC0415
  except ImportError as error:
    raise ImportError("exact betweenness labels need igraph: pip install -e "
                      "'.[betweenness]'") from error
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if graph.num_nodes >= PARALLEL_LABELS_FROM else 1
  workers = max(1, min(workers, graph.num_nodes))
  if workers == 1:
    g = igraph.Graph(n=graph.num_nodes, edges=graph.edges().tolist(), directed=graph.directed)
    return np.asarray(g.betweenness(directed=graph.directed), np.float64)
  # Worker processes started afresh (not forked from a process that may run JAX's
  # threads, and not re-importing the caller's main module as multiprocessing's spawn
  # does), handed the arcs and their sources through files.
  bounds = np.linspace(0, graph.num_nodes, workers + 1).astype(int)
  with tempfile.TemporaryDirectory(prefix="sdl-betweenness-") as tmp:
    np.save(f"{tmp}/edges.npy", graph.edges())
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; from sdl.data.graphs import "
                               "_betweenness_share as f; f(*sys.argv[1:])", tmp,
                               str(graph.num_nodes), str(int(graph.directed)), str(lo), str(hi)])
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    codes = [proc.wait() for proc in procs]
    if any(codes):
      raise RuntimeError(f"exact betweenness: a worker failed (exit codes {codes}); its error "
                         "is above")
    return np.sum([np.load(f"{tmp}/share-{lo}.npy") for lo in bounds[:-1]], axis=0,
                  dtype=np.float64)


def _betweenness_share(tmp: str, num_nodes: str, directed: str, lo: str, hi: str) -> None:
  """A worker of `exact_betweenness`: the part of every node's betweenness from shortest
  paths that start at sources lo..hi-1, written to `tmp`/share-lo.npy."""
  import igraph  # noqa: PLC0415
  directed = bool(int(directed))
  g = igraph.Graph(n=int(num_nodes), edges=np.load(f"{tmp}/edges.npy").tolist(),
                   directed=directed)
  share = g.betweenness(directed=directed, sources=range(int(lo), int(hi)))
  np.save(f"{tmp}/share-{lo}.npy", np.asarray(share, np.float64))


def _has_arcs(graph: Graph, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether each arc u[i] -> v[i] is in `graph` (arcs are sorted by sender, receiver)."""
  keys = graph.senders.astype(np.int64) * graph.num_nodes + graph.receivers
  query = u.astype(np.int64) * graph.num_nodes + v
  at = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
  return (keys[at] == query) if len(keys) else np.zeros(len(query), bool)


def never_between(graph: Graph, max_degree: int = 32) -> np.ndarray:
  """bool [nodes]: nodes that lie inside no shortest path, so their betweenness is 0.

  A node v is inside a shortest path u -> v -> w only if it has an arc in and an arc out
  (u ≠ w), and only if u has no arc straight to w: a path through v is then 2 long where
  u -> w is 1. So v is never between where
    - it has no in-arc or no out-arc (an undirected graph: degree ≤ 1), GNN-Bet's rule; or
    - every in-neighbour u has an arc to every out-neighbour w ≠ u (an undirected graph:
      v's neighbours form a clique, a simplicial node). Any longer path through v
      contains some u -> v -> w and is shortcut there.
  The second rule is checked for nodes with at most `max_degree` in- and out-neighbours
  (the work is their product); higher-degree nodes are treated as possibly between.
  """
  from sdl.kernels import brandes  # noqa: PLC0415
  if brandes.available():  # the same rule, stopping at a node's first missing arc
    if graph.directed:
      by_receiver = np.argsort(graph.receivers, kind="stable")
      in_ptr = np.zeros(graph.num_nodes + 1, np.int64)
      np.cumsum(graph.in_degree(), out=in_ptr[1:])
      in_csr = (in_ptr, graph.senders[by_receiver])
    else:
      in_csr = csr(graph)
    return brandes.never_between(csr(graph), in_csr, max_degree)
  return _never_between_numpy(graph, max_degree)


def _never_between_numpy(graph: Graph, max_degree: int) -> np.ndarray:
  ins, outs = graph.in_degree(), graph.out_degree()
  result = (ins == 0) | (outs == 0)
  candidates = np.flatnonzero(~result & (ins <= max_degree) & (outs <= max_degree))
  if not len(candidates):
    return result
  by_receiver = np.argsort(graph.receivers, kind="stable")
  in_start = np.concatenate([[0], np.cumsum(ins)])
  out_start = np.concatenate([[0], np.cumsum(outs)])  # arcs are sorted by sender
  in_of = graph.senders[by_receiver]  # in-neighbours, grouped by receiver
  for d_in in np.unique(ins[candidates]):
    for d_out in np.unique(outs[candidates[ins[candidates] == d_in]]):
      group = candidates[(ins[candidates] == d_in) & (outs[candidates] == d_out)]
      us = in_of[in_start[group][:, None] + np.arange(d_in)]            # [g, d_in]
      ws = graph.receivers[out_start[group][:, None] + np.arange(d_out)]  # [g, d_out]
      u = np.broadcast_to(us[:, :, None], (len(group), d_in, d_out))
      w = np.broadcast_to(ws[:, None, :], (len(group), d_in, d_out))
      needed = u != w
      ok = _has_arcs(graph, u[needed], w[needed])
      closed = np.ones(u.shape, bool)
      closed[needed] = ok
      result[group] = closed.reshape(len(group), -1).all(1)
  return result


def csr(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
  """(indptr int64 [nodes + 1], indices int32 [arcs]): the arcs out of v are
  `indices[indptr[v]:indptr[v + 1]]` (arcs are sorted by sender)."""
  indptr = np.zeros(graph.num_nodes + 1, np.int64)
  np.cumsum(graph.out_degree(), out=indptr[1:])
  return indptr, graph.receivers


def _dependencies_numpy(graph: Graph, sources: np.ndarray) -> np.ndarray:
  """`kernels.brandes.source_dependencies` level by level in NumPy (no compiler)."""
  n, src, dst = graph.num_nodes, graph.senders, graph.receivers
  total = np.zeros(n)
  for s in sources:
    dist = np.full(n, -1)
    dist[s], level = 0, 0
    while True:  # breadth-first levels
      reached = np.unique(dst[(dist[src] == level) & (dist[dst] < 0)])
      if not len(reached):
        break
      level += 1
      dist[reached] = level
    on_path = (dist[src] >= 0) & (dist[dst] == dist[src] + 1)  # shortest-path DAG arcs
    u, v = src[on_path], dst[on_path]
    sigma, delta = np.zeros(n), np.zeros(n)
    sigma[s] = 1.0
    for d in range(level):
      at = dist[u] == d
      sigma += np.bincount(v[at], weights=sigma[u[at]], minlength=n)
    for d in range(level - 1, -1, -1):
      at = dist[u] == d
      delta += np.bincount(u[at], weights=sigma[u[at]] / sigma[v[at]] * (1 + delta[v[at]]),
                           minlength=n)
    delta[s] = 0.0
    total += delta
  return total


def source_dependencies(graph: Graph, sources) -> np.ndarray:
  """float64 [nodes]: the sum over `sources` of each node's dependency delta_s(v) (the
  share of shortest paths from s through v), by `sdl.kernels.brandes` or, without a C++
  compiler, NumPy."""
  from sdl.kernels import brandes  # noqa: PLC0415
  sources = np.asarray(sources, np.int64)
  if brandes.available():
    return brandes.source_dependencies(*csr(graph), sources)
  return _dependencies_numpy(graph, sources)


PIVOTS = 32


def pivots(num_nodes: int, count: int = PIVOTS) -> np.ndarray:
  """The sampled sources of `sampled_betweenness`: `count` distinct nodes, drawn with a
  fixed seed, so a graph always gets the same estimate."""
  return np.sort(np.random.default_rng(0).choice(num_nodes, min(count, num_nodes),
                                                 replace=False))


def sampled_betweenness(graph: Graph, count: int = PIVOTS) -> np.ndarray:
  """Betweenness estimated from `count` sampled sources (Brandes & Pich's pivots): the
  sources' dependencies times n / count, halved on an undirected graph (unordered pairs),
  so that with every node a source it is exact betweenness."""
  sources = pivots(graph.num_nodes, count)
  scale = graph.num_nodes / len(sources) / (1 if graph.directed else 2)
  return source_dependencies(graph, sources) * scale


FEATURE_HOPS = 3


def node_features(graph: Graph, hops: int = FEATURE_HOPS, pivots: int = 0) -> np.ndarray:
  """float32 [nodes, 2 · hops + (1 if pivots) + 1]: size-independent inputs for a
  betweenness ranker.

  For each direction (arcs out, arcs in), the number of walks of 1 .. `hops` steps from
  the node (its degree, the degree mass of its neighbours, ...), as log(1 + count) minus
  the graph's mean of the same, so that the same local shape scores the same in graphs
  of any size; with `pivots`, the betweenness estimated from that many sampled sources
  (`sampled_betweenness`), as log(1 + estimate / its mean) minus the mean of that (the
  same for any scale of the estimate, so for any graph size): what no few hops of
  message passing see, how much of the whole graph's traffic a node carries; and last,
  whether the node can lie inside a shortest path at all (`never_between`). No node ids:
  one model ranks graphs it never saw.
  """
  columns = []
  for forward in (True, False):
    src, dst = (graph.senders, graph.receivers) if forward else (graph.receivers, graph.senders)
    walks = np.ones(graph.num_nodes, np.float64)
    for _ in range(hops):
      # walks[u] <- sum over arcs u -> v of walks[v]
      walks = np.bincount(src, weights=walks[dst], minlength=graph.num_nodes)
      logs = np.log1p(walks)
      columns.append(logs - logs.mean())
  if pivots:
    estimate = sampled_betweenness(graph, pivots)
    logs = np.log1p(estimate / max(estimate.mean(), 1e-12))
    columns.append(logs - logs.mean())
  columns.append(~never_between(graph))
  return np.stack(columns, 1).astype(np.float32)


class EdgeListError(ValueError):
  """An edge-list file that cannot be read as a graph; the message names file and line."""


def _parse_lines(path: str, text: str):
  """The general path: any node names, `#` comments, blank lines."""
  names, pairs = {}, []
  for number, line in enumerate(text.splitlines(), 1):
    fields = line.split("#", 1)[0].split()
    if not fields:
      continue
    if len(fields) != 2:
      raise EdgeListError(_bad_line(path, number, line, len(fields)))
    pairs.append([names.setdefault(f, len(names)) for f in fields])
  return np.array(pairs, np.int64).reshape(-1, 2), list(names)


def _bad_line(path: str, number: int, line: str, columns: int) -> str:
  why = ("a third column (a weight?): weighted betweenness is not supported; give "
         "unweighted edges, two node ids a line" if columns == 3 else
         f"{columns} field{'' if columns == 1 else 's'} where an edge has two node ids")
  return f"{path}, line {number}: {why}: {line.strip()[:80]!r}"


def _relabel(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sorted distinct ids, each id's index among them)."""
  low, high = int(ids.min()), int(ids.max())
  if high - low < 4 * len(ids) + 1024:  # dense enough: a lookup table, no sort
    present = np.zeros(high - low + 1, bool)
    present[ids - low] = True
    index = np.cumsum(present) - 1
    return np.flatnonzero(present) + low, index[ids - low]
  return np.unique(ids, return_inverse=True)


def read_edge_list(path: str, directed: bool) -> tuple[Graph, np.ndarray, Cleaned]:
  """The graph in the edge-list file `path` (one `u v` a line; blank lines and `#`
  comments allowed; node ids any integers or strings), the node names by index, and what
  was dropped (self-loops, repeats). Files of integer ids without comments take a
  vectorised path (numpy over the bytes); others are parsed line by line."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise EdgeListError(f"{path}: no such edge-list file") from None
  except OSError as error:
    raise EdgeListError(f"{path}: {error.strerror}") from None
  edges = names = None
  if b"#" not in raw:
    data = np.frombuffer(raw, np.uint8)
    space = data <= ord(" ")  # ASCII whitespace and controls separate fields
    starts = np.flatnonzero(~space & np.concatenate([[True], space[:-1]]))  # field starts
    breaks = np.flatnonzero(data == ord("\n"))
    bounds = np.concatenate([[0], breaks + 1, [len(data)]])
    columns = np.diff(np.searchsorted(starts, bounds))  # fields on each line
    bad = np.flatnonzero((columns != 0) & (columns != 2))
    if len(bad):
      line = raw.split(b"\n")[bad[0]].decode("utf-8", "replace")
      raise EdgeListError(_bad_line(path, int(bad[0]) + 1, line, int(columns[bad[0]])))
    with warnings.catch_warnings():  # a name stops the parse (a warning or an error,
      warnings.simplefilter("ignore")  # by NumPy version): the slow path
      try:
        ids = np.fromstring(raw, dtype=np.int64, sep=" ") if len(starts) else np.zeros(0, int)
      except ValueError:
        ids = np.zeros(0, np.int64)
    if len(starts) and len(ids) == len(starts):  # every field was an integer
      names, edges = _relabel(ids)
      edges = edges.reshape(-1, 2)
  if edges is None:
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
      raise EdgeListError(f"{path}: not a text file ({error})") from None
    edges, names = _parse_lines(path, text)
    names = np.asarray(names)
  if not len(edges):
    raise EdgeListError(f"{path}: no edges (an empty graph has no betweenness to rank)")
  graph, cleaned = from_edges(len(names), edges, directed)
  return graph, names, cleaned
