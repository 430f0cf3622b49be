"""The betweenness trainer, top to bottom: labelled graphs, padded batches of whole graphs,
a pairwise ranking loss, the generic loop, and ranking metrics on held-out graphs.

Batches: `train.batch_size` training graphs per step, joined into one jraph
`GraphsTuple` and padded to one fixed size (the largest graphs' nodes and arcs times the
batch), so the step compiles once. The loss is RankNet's on node pairs sampled within
each graph (`data.pairs_per_node` per node; a share `data.top_pairs` of them with the first
node among the graph's top 10 %, whose order the top-k% metrics judge and which uniform
pairs rarely compare): softplus(-t (s_i - s_j)), t the sign of the difference of their
exact betweenness, over nodes that can lie on a path at all (the rest
have betweenness 0 and are ranked last by rule, `ranking_scores`). Evaluation scores each
held-out graph alone (padded to a power of two) and reports Kendall tau-b and top-1/5/10 %
accuracy against the exact labels, means over the graphs (`eval_kendall_tau`, ...), and
for directed graphs tau over the nodes of nonzero betweenness (`eval_kendall_tau_nonzero`).
"""
import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from sdl.data import betweenness as data
from sdl.data import graphs
from sdl.data.sampler import EpochSampler
from sdl.models.betweenness import BetweennessGNN, ranking_scores
from sdl.optim import make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.train import export as export_lib
from sdl.train import loop, ranking
from sdl.train.checkpoint import abstract_like
from sdl.train.step import Model, TrainState, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A labelled graph with what the model reads."""
  name: str
  graph: graphs.Graph
  features: np.ndarray  # float32 [nodes, features]
  betweenness: np.ndarray


def prepare(item: data.Labelled, pivots: int = 0) -> Prepared:
  """`item` with its features (`graphs.node_features`, `pivots` sampled sources)."""
  return Prepared(item.name, item.graph, graphs.node_features(item.graph, pivots=pivots),
                  item.betweenness)


def validate(config) -> None:
  loop.check_train_config(config)
  d = config.data
  for family in (*d.families, d.val_family):
    if family not in data.FAMILIES[d.directed]:
      kind = "directed" if d.directed else "undirected"
      raise ConfigError(f"data families: {family!r} is no {kind} family; choose from "
                        f"{data.FAMILIES[d.directed]}")
  if d.train_graphs * len(d.families) * len(d.train_sizes) < config.train.batch_size:
    raise ConfigError(f"train.batch_size={config.train.batch_size} graphs per step, but the "
                      "data makes fewer training graphs; lower it or add data.train_graphs")
  if min(d.train_sizes) < 8 or min(d.val_sizes) < 8:
    raise ConfigError("data.train_sizes and data.val_sizes: graphs of at least 8 nodes")


def load_split(config, split: str) -> list[Prepared]:
  d = config.data
  if split == "train":
    families, sizes, seeds = d.families, d.train_sizes, range(d.train_graphs)
  else:  # disjoint seeds
    families, sizes, seeds = (d.val_family,), d.val_sizes, range(10_000, 10_000 + d.val_graphs)
  paths = data.write_graphs(os.path.join(d.path, split), families, sizes, seeds, d.directed)
  return [prepare(data.load(p), d.get("pivots", 0)) for p in paths]


def as_graphs_tuple(items: list[Prepared], n_node: int, n_edge: int) -> jraph.GraphsTuple:
  """`items` joined and padded to `n_node` nodes and `n_edge` arcs (one padding graph)."""
  joined = jraph.batch_np([jraph.GraphsTuple(
      nodes=p.features, edges=None, globals=None, senders=p.graph.senders,
      receivers=p.graph.receivers, n_node=np.array([p.graph.num_nodes]),
      n_edge=np.array([p.graph.num_arcs])) for p in items])
  return jraph.pad_with_graphs(joined, n_node=n_node, n_edge=n_edge, n_graph=len(items) + 1)


def bucket(n: int) -> int:
  """`n` rounded up to a sixteenth of the next power of two: a few sizes per octave, so
  graphs of similar size share a compile, and at most 1/8 of the work is padding (whole
  powers of two padded a 10k-node graph's 80k arcs to 131k)."""
  step = max(1, (1 << max(0, math.ceil(math.log2(max(n, 1))))) // 16)
  return -(-n // step) * step


def loss_fn(scores, batch):
  i, j = batch["pairs"][:, 0], batch["pairs"][:, 1]
  margin = batch["target"] * (scores[i] - scores[j])
  weight = batch["weight"]
  total = jnp.maximum(weight.sum(), 1.0)
  loss = (jax.nn.softplus(-margin) * weight).sum() / total
  return loss, {"pair_accuracy": ((margin > 0) * weight).sum() / total}


@dataclasses.dataclass(frozen=True)
class Batcher:
  """Training batches: whole graphs padded to one size, with sampled ranked pairs."""
  items: list[Prepared]
  batch_size: int
  pairs_per_node: int
  seed: int
  top_pairs: float = 0.0  # the share of pairs whose first node is in the top 10 %

  def __post_init__(self):
    largest_nodes = max(p.graph.num_nodes for p in self.items)
    largest_arcs = max(p.graph.num_arcs for p in self.items)
    object.__setattr__(self, "n_node", largest_nodes * self.batch_size + 1)
    object.__setattr__(self, "n_edge", largest_arcs * self.batch_size)
    object.__setattr__(self, "n_pairs", self.pairs_per_node * largest_nodes * self.batch_size)
    object.__setattr__(self, "sampler", EpochSampler(len(self.items), self.batch_size,
                                                     self.seed))
    object.__setattr__(self, "pools", [self._pool(p) for p in self.items])

  @staticmethod
  def _pool(p: Prepared) -> tuple:
    """(nodes that can lie on a path, log1p labels, the top 10 % of those nodes)."""
    can = np.flatnonzero(p.features[:, -1] > 0)
    label = np.log1p(p.betweenness)
    top = can[np.argsort(-label[can], kind="stable")[:max(2, len(can) // 10)]]
    return can, label, top

  def __call__(self, step: int) -> dict:
    picked = np.sort(self.sampler.indices(step))
    chosen = [self.items[i] for i in picked]
    rng = np.random.default_rng([self.seed, step])
    pairs, targets, offset = [], [], 0
    for i, p in zip(picked, chosen):
      can, label, top = self.pools[i]
      count = self.pairs_per_node * p.graph.num_nodes
      if len(can) >= 2:
        ij = can[rng.integers(0, len(can), (count, 2))]
        if self.top_pairs:  # some pairs start at the top 10 %: the order that matters most
          first = rng.random(count) < self.top_pairs
          ij[first, 0] = top[rng.integers(0, len(top), first.sum())]
        pairs.append(ij + offset)
        targets.append(np.sign(label[ij[:, 0]] - label[ij[:, 1]]))
      offset += p.graph.num_nodes
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    targets = np.concatenate(targets) if targets else np.zeros(0)
    keep = min(len(pairs), self.n_pairs)
    out_pairs = np.zeros((self.n_pairs, 2), np.int32)
    out_target = np.zeros(self.n_pairs, np.float32)
    out_pairs[:keep], out_target[:keep] = pairs[:keep], targets[:keep]
    return {"graph": as_graphs_tuple(chosen, self.n_node, self.n_edge), "pairs": out_pairs,
            "target": out_target, "weight": (out_target != 0).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Compiled:
  init_state: Callable[[], TrainState]
  train_step: Callable
  score: Callable  # (params, GraphsTuple) -> ranking scores
  schedule: Callable
  abstract_state: TrainState


def build(config, example: dict) -> Compiled:
  mesh = make_mesh((1,), ("data",), devices=jax.devices()[:1])
  part = Partitioner.create(mesh, {"batch": "data"})
  m = config.model
  module = BetweennessGNN(width=m.width, depth=m.depth, mean_second_branch=m.mean_second_branch,
                          own_features=m.get("own_features", False))
  directed = bool(config.data.directed)
  model = Model(module, inputs=lambda batch: (batch["graph"],),
                kwargs=lambda rng, train: {"directed": directed})
  optimizer = make_optimizer(config.optim, config.train.steps)
  init = lambda: init_state(model, optimizer.tx, example, config.seed)
  state_shape = jax.eval_shape(init)
  state_sharding = part.state_shardings(state_shape)
  step = make_train_step(model, loss_fn, optimizer.tx, skip_nonfinite=config.train.skip_nonfinite)
  train_step = jax.jit(step, donate_argnums=0, static_argnums=2)

  return Compiled(jax.jit(init, out_shardings=state_sharding), train_step,
                  scorer(module, directed),
                  optimizer.schedule, abstract_like(state_shape, state_sharding))


def scorer(module: BetweennessGNN, directed: bool) -> Callable:
  """The jitted `(params, GraphsTuple) -> ranking scores`."""
  return jax.jit(lambda params, graph: ranking_scores(
      module.apply({"params": params}, graph, directed), graph))


def padded_alone(item: Prepared) -> jraph.GraphsTuple:
  """One graph padded to size buckets (graphs of similar size share a compile)."""
  g = item.graph
  return as_graphs_tuple([item], bucket(g.num_nodes + 1), bucket(max(g.num_arcs, 1)))


def score_graph(score: Callable, params, item: Prepared) -> np.ndarray:
  """Ranking scores of one graph's nodes by `score` (a `scorer`)."""
  return np.asarray(score(params, padded_alone(item)))[:item.graph.num_nodes]


def metrics_of(predicted: np.ndarray, exact: np.ndarray, directed: bool) -> dict:
  finite = np.where(np.isfinite(predicted), predicted, np.min(predicted[np.isfinite(predicted)],
                                                              initial=0.0) - 1.0)
  out = {"kendall_tau": ranking.kendall_tau_b(finite, exact)}
  for pct in (1, 5, 10):
    out[f"top{pct}"] = ranking.top_k_accuracy(finite, exact, pct / 100)
  if directed:
    nonzero = exact > 0
    out["kendall_tau_nonzero"] = ranking.kendall_tau_b(finite[nonzero], exact[nonzero])
  return out


def evaluate(score: Callable, params, items: list[Prepared], directed: bool) -> dict:
  per_graph = [metrics_of(score_graph(score, params, p), p.betweenness, directed)
               for p in items]
  return {k: float(np.nanmean([m[k] for m in per_graph])) for k in per_graph[0]}


def run(config, workdir: str, *, hooks=()) -> TrainState:
  """Train as `config` says, in `workdir` (resuming if it holds checkpoints)."""
  validate(config)
  loop.check_workdir(workdir)
  train = load_split(config, "train")
  val = load_split(config, "val")
  batches = Batcher(train, config.train.batch_size, config.data.pairs_per_node, config.seed,
                    config.data.top_pairs)
  c = build(config, batches(0))
  done = loop.finished(workdir, config, c.abstract_state)
  if done is not None:
    return done
  print(f"betweenness GNN on {len(train)} training graphs ({batches.n_node} nodes, "
        f"{batches.n_edge} arcs a batch), {len(val)} held-out graphs", flush=True)
  return loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                  abstract_state=c.abstract_state, train_step=c.train_step,
                  get_batch=batches,
                  evaluate=lambda s: evaluate(c.score, s.params, val, config.data.directed),
                  schedule=c.schedule, hooks=hooks)


# --- a trained model as two small files, for `experiments.rank_betweenness` ---------------

# The model `experiments.rank_betweenness` uses unless told otherwise (README, docs).
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
# The models `experiments.rank_betweenness` uses unless told otherwise (README, docs): for
# undirected graphs (trained on powerlaw-cluster graphs), directed ones, and undirected
# graphs of other kinds (road-like, partitioned: the `mixed` variant).
SHIPPED = os.path.join(MODELS, "betweenness_undirected")
SHIPPED_DIRECTED = os.path.join(MODELS, "betweenness_directed")
SHIPPED_MIXED = os.path.join(MODELS, "betweenness_mixed")


def example_batch(directed: bool, pivots: int = 0) -> dict:
  """A batch of one 3-node path: the shapes `build` needs (parameters do not depend on
  a graph's size)."""
  path, _ = graphs.from_edges(3, np.array([[0, 1], [1, 2]]), directed)
  item = prepare(data.Labelled(path, np.zeros(3), "example"), pivots)
  return Batcher([item], 1, 1, 0)(0)


def export(workdir: str, out: str) -> str:
  """Write the latest checkpoint's parameters in `workdir` as `out/params.npz`, with the
  model's settings in `out/model.json` (what ranking needs; no optimiser state)."""
  config, state = export_lib.latest_state(workdir, lambda config: build(
      config, example_batch(config.data.directed, config.data.get("pivots", 0))).abstract_state)
  spec = {"model": config.model.to_dict(), "directed": bool(config.data.directed),
          "feature_hops": graphs.FEATURE_HOPS,
          "pivots": int(config.data.get("pivots", 0)), "step": int(state.step),
          "trained_on": config.data.to_dict()}
  return export_lib.write(out, state.params, spec)


def load_exported(directory: str):
  """(module, params, spec) of a model written by `export`."""
  params, spec = export_lib.read(directory, "a betweenness model",
                                 "experiments.rank_betweenness --export")
  m = spec["model"]
  module = BetweennessGNN(width=m["width"], depth=m["depth"],
                          mean_second_branch=m["mean_second_branch"],
                          own_features=m.get("own_features", False))
  return module, params, spec


def score_exported(module, params, item: Prepared, directed: bool) -> tuple[np.ndarray, dict]:
  """Ranking scores of `item`'s nodes by an exported model, and the seconds it took to
  compile (`compile_s`) and to score (`score_s`), apart."""
  import time  # noqa: PLC0415
  t0 = time.perf_counter()
  padded = padded_alone(item)
  t1 = time.perf_counter()
  compiled = scorer(module, directed).lower(params, padded).compile()
  t2 = time.perf_counter()
  scores = np.asarray(compiled(params, padded))[:item.graph.num_nodes]
  # scoring counts the padding into a size bucket too; only compiling is apart
  return scores, {"compile_s": t2 - t1, "score_s": t1 - t0 + time.perf_counter() - t2}


def write_ranking(path: str, names, scores: np.ndarray) -> None:
  """`node,score,rank` (rank 1: the highest score; ties by input order), atomically."""
  order = ranking.top_k(np.where(np.isfinite(scores), scores, -np.inf), len(scores))
  rank = np.empty(len(scores), np.int64)
  rank[order] = np.arange(1, len(scores) + 1)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write("node,score,rank\n")
    f.writelines(f"{n},{s:.6g},{r}\n" for n, s, r in zip(names, scores, rank))
  os.replace(tmp, path)
