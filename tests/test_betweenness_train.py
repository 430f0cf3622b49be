"""The betweenness trainer end to end (the smoke variant): labelled graphs cached and
reused, a run killed after step 4 resumes bit-identically, and the evaluation's metrics
are the ranking metrics of the model's own scores."""
import os

import jax
import numpy as np
import pytest

from experiments.configs import betweenness as configs
from experiments.trainers import betweenness as trainer
from sdl.train import ranking
from sdl.train.metrics import read_jsonl


class Crash(Exception):
  pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("betweenness-data"))


def smoke(data_dir):
  config = configs.get_config("smoke")
  config.data.path = data_dir
  return config


def test_smoke_trains_caches_its_graphs_and_resumes_bit_identically(data_dir, tmp_path):
  config = smoke(data_dir)
  straight = trainer.run(config, str(tmp_path / "straight"))
  cached = sorted(os.listdir(os.path.join(data_dir, "train")))
  assert len(cached) == 6 and all(name.endswith(".npz") for name in cached)
  stamps = {n: os.path.getmtime(os.path.join(data_dir, "train", n)) for n in cached}

  def crash_after_4(step, state):
    if step == 4:
      raise Crash
  workdir = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    trainer.run(config, workdir, hooks=[crash_after_4])
  resumed = trainer.run(config, workdir)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert {n: os.path.getmtime(os.path.join(data_dir, "train", n)) for n in cached} == stamps
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  want = read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
  assert [r["loss"] for r in records] == [r["loss"] for r in want]
  evals = [r for r in records if "eval_kendall_tau" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(-1 <= r["eval_kendall_tau"] <= 1 and 0 <= r["eval_top10"] <= 1 for r in evals)


def test_evaluation_is_the_ranking_metrics_of_the_scores(data_dir):
  config = smoke(data_dir)
  val = trainer.load_split(config, "val")
  batches = trainer.Batcher(trainer.load_split(config, "train"), 2, 4, 0)
  c = trainer.build(config, batches(0))
  params = c.init_state().params
  got = trainer.evaluate(c.score, params, val, directed=False)
  taus = []
  for item in val:
    scores = trainer.score_graph(c.score, params, item)
    never = item.features[:, -1] == 0
    assert np.isneginf(scores[never]).all() and np.isfinite(scores[~never]).all()
    taus.append(ranking.kendall_tau_b(np.where(never, scores[~never].min() - 1, scores),
                                      item.betweenness))
  assert got["kendall_tau"] == pytest.approx(np.mean(taus))


def test_batches_pair_nodes_within_each_graph_only(data_dir):
  config = smoke(data_dir)
  items = trainer.load_split(config, "train")
  batches = trainer.Batcher(items, 2, 4, 0)
  batch = batches(1)
  graph = batch["graph"]
  starts = np.concatenate([[0], np.cumsum(graph.n_node)])
  which = np.searchsorted(starts, batch["pairs"], side="right") - 1  # graph of each node
  used = batch["weight"] > 0
  assert used.sum() > 0
  assert (which[used, 0] == which[used, 1]).all() and (which[used] < len(graph.n_node) - 1).all()
  assert graph.nodes.shape[0] == batches.n_node and graph.senders.shape[0] == batches.n_edge


def command(name, *args):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args],
                        cwd=root, capture_output=True, text=True, timeout=300)


def rank_command(*args):
  return command("rank_betweenness", *args)


def table_rows(text: str) -> dict:
  """{(nodes, method): [means]} of a markdown table's `mean ± std` cells."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) > 3 and "±" in cells[2]:
      rows[cells[0], cells[1]] = [float(c.split("±")[0]) for c in cells[2:-1]]
  return rows


def check_eval_command(exported, data, tmp_path):
  """The evaluation command's table: exact labels rank perfectly, and the GNN's and the
  degree baseline's rows are the ranking metrics of their scores, computed here."""
  from sdl.data import betweenness as data_module  # noqa: PLC0415
  cache = str(tmp_path / "eval")
  out = command("betweenness_eval", f"--checkpoint={exported}", "--sizes=70", "--graphs=2",
                f"--data={cache}", "--baselines=degree,exact,estimate,kadabra_0.01")
  assert out.returncode == 0, out.stderr[-2000:]
  rows = table_rows(out.stdout)
  assert set(rows) == {("70", m) for m in ("GNN", "degree", "exact", "estimate",
                                           "kadabra_0.01")}
  assert rows["70", "exact"] == [1.0, 1.0, 1.0, 1.0]
  module, params, _ = trainer.load_exported(exported)
  items = [data_module.load(f"{cache}/powerlaw_cluster/powerlaw_cluster-70-{s}.npz")
           for s in (20000, 20001)]
  keys = ("kendall_tau", "top1", "top5", "top10")
  for method in ("GNN", "degree"):
    per_graph = []
    for item in items:
      scores = (trainer.score_exported(module, params, trainer.prepare(item), False)[0]
                if method == "GNN" else item.graph.out_degree().astype(float))
      per_graph.append(trainer.metrics_of(scores, item.betweenness, False))
    expected = [np.mean([m[k] for m in per_graph]) for k in keys]
    np.testing.assert_allclose(rows["70", method], expected, atol=6e-4)


def test_rank_command_ranks_a_users_graph_with_an_exported_model(data_dir, tmp_path):
  config = smoke(data_dir)
  workdir = str(tmp_path / "run")
  trainer.run(config, workdir)
  exported = str(tmp_path / "model")
  out = rank_command(f"--checkpoint={workdir}", f"--export={exported}")
  assert out.returncode == 0, out.stderr[-2000:]
  module, params, spec = trainer.load_exported(exported)
  assert spec["step"] == config.train.steps and spec["model"]["width"] == config.model.width
  edges = tmp_path / "g.txt"  # named nodes, a comment, a repeat, a self-loop, two parts
  edges.write_text("# my graph\nhub a\nhub b\nhub c\nc d\nd e\nhub a\ne e\n\nx y\ny z\n")
  csv = tmp_path / "ranks.csv"
  out = rank_command(f"--checkpoint={exported}", f"--edges={edges}", f"--out={csv}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "dropped 1 self-loops and 1 repeated edges" in out.stderr
  assert all(f"{s}:" in out.stderr for s in ("features", "compile", "score"))
  header, *rows = csv.read_text().splitlines()
  assert header == "node,score,rank"
  table = {n: (float(s), int(r)) for n, s, r in (row.split(",") for row in rows)}
  assert set(table) == set("hub a b c d e x y z".split())
  assert sorted(r for _, r in table.values()) == list(range(1, 10))
  # the leaves lie on no shortest path: score -inf, ranked after every other node
  leaves = {"a", "b", "e", "x", "z"}  # (e: its self-loop dropped)
  assert all(table[n][0] == float("-inf") for n in leaves)
  assert min(table[n][1] for n in leaves) > max(table[n][1] for n in set(table) - leaves)
  check_eval_command(exported, data_dir, tmp_path)
  # the shipped models: one per kind of graph; --directed picks the directed one
  for path, directed, pivots in ((trainer.SHIPPED, False, 0), (trainer.SHIPPED_DIRECTED, True, 0),
                                 (trainer.SHIPPED_MIXED, False, 32)):
    _, _, shipped = trainer.load_exported(path)
    assert (shipped["directed"], shipped["pivots"]) == (directed, pivots), path
  out = rank_command(f"--edges={edges}", f"--out={csv}", "--directed")
  assert out.returncode == 0 and "note: the model was trained" not in out.stderr, out.stderr
  bad = tmp_path / "bad.txt"
  bad.write_text("1 2\n2 3 0.5\n")
  out = rank_command(f"--checkpoint={exported}", f"--edges={bad}")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: {bad}, line 2: a third column (a weight?): weighted betweenness is not "
      "supported; give unweighted edges, two node ids a line: '2 3 0.5'")
