r"""Rank the nodes of your graph by betweenness with a trained model.

    python -m experiments.rank_betweenness --edges=FILE [--directed] [--out=FILE.csv] \
        [--checkpoint=DIR]

`--edges`: one edge `u v` a line; blank lines and `#` comments are fine; node ids are any
integers or strings. Self-loops and repeated edges are dropped (and counted); a third
column is an error (weighted betweenness is not supported); disconnected graphs are fine.
`--out` (default: the edge file's name with `.betweenness.csv`): `node,score,rank`, rank 1
the most between; nodes that lie inside no shortest path (exact betweenness 0) have score
`-inf` and come last. `--checkpoint`: a model directory (`model.json`, `params.npz`; the
default is the one shipped in `experiments/models/` for the graph's kind: powerlaw-like
undirected graphs, or with `--directed` directed ones; `betweenness_mixed` there is for
road-like and partitioned graphs) or a training workdir, exported on the fly.
`--export=DIR` writes a training workdir's model as such a directory.

Each stage's time goes to stderr (read, features, compile, score, write), so the speed
of a big graph can be read off one run.
"""
import sys
import time

from absl import app, flags, logging

from experiments.trainers import entry
from experiments.trainers.betweenness import SHIPPED, SHIPPED_DIRECTED

_EDGES = flags.DEFINE_string("edges", None, "Edge-list file: one `u v` per line.")
_DIRECTED = flags.DEFINE_bool("directed", False, "Read u v as an arc u -> v.")
_OUT = flags.DEFINE_string("out", None, "CSV to write (default: <edges>.betweenness.csv).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", SHIPPED, "Model directory or training workdir (default: the shipped model "
    f"for undirected graphs; with --directed, {SHIPPED_DIRECTED}).")
_EXPORT = flags.DEFINE_string("export", None, "Write --checkpoint's model here and stop.")


def stage(name: str, start: float) -> float:
  now = time.perf_counter()
  print(f"{name}: {now - start:.2f} s", file=sys.stderr, flush=True)
  return now


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax's restore chatter, when a workdir is given
  from experiments.trainers import betweenness as trainer  # noqa: PLC0415
  from sdl.data import graphs  # noqa: PLC0415
  from sdl.errors import UserError  # noqa: PLC0415
  try:
    model_dir = _CHECKPOINT.value
    if _DIRECTED.value and not flags.FLAGS["checkpoint"].present:
      model_dir = SHIPPED_DIRECTED
    model_dir = entry.model_directory(model_dir, _EXPORT.value, trainer.export)
    if model_dir is None:
      return
    if not _EDGES.value:
      raise trainer.ConfigError("--edges=FILE: the graph to rank (one `u v` per line)")
    t = time.perf_counter()
    graph, names, cleaned = graphs.read_edge_list(_EDGES.value, _DIRECTED.value)
    t = stage(f"read {graph.num_nodes:,} nodes, {len(graph.edges()):,} edges", t)
    if cleaned.self_loops or cleaned.duplicates:
      print(f"dropped {cleaned.self_loops} self-loops and {cleaned.duplicates} repeated edges",
            file=sys.stderr)
    module, params, spec = trainer.load_exported(model_dir)
    if spec["directed"] != _DIRECTED.value:
      kind = "directed" if spec["directed"] else "undirected"
      print(f"note: the model was trained on {kind} graphs", file=sys.stderr)
    t = time.perf_counter()
    item = trainer.Prepared("input", graph,
                            graphs.node_features(graph, pivots=spec.get("pivots", 0)), None)
    stage("features", t)
    scores, seconds = trainer.score_exported(module, params, item, _DIRECTED.value)
    print(f"compile: {seconds['compile_s']:.2f} s\nscore: {seconds['score_s']:.2f} s",
          file=sys.stderr)
  except (graphs.EdgeListError, UserError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  out = _OUT.value or f"{_EDGES.value}.betweenness.csv"
  t = time.perf_counter()
  trainer.write_ranking(out, names, scores)
  stage(f"wrote {out}", t)


if __name__ == "__main__":
  app.run(main)
