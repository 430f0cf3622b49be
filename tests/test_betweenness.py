"""Betweenness ranking's parts: labels against networkx, the never-between rule by hand and
against exact labels, message passing against dense numpy, padding and batching, and the
ranking metrics against scipy and direct set computations."""
import jax
import jax.numpy as jnp
import jraph
import networkx as nx
import numpy as np
import pytest
import scipy.stats

from sdl.data import graphs
from sdl.models.betweenness import BetweennessGNN, pass_messages, ranking_scores
from sdl.train import ranking


def graph_of(g: nx.Graph) -> graphs.Graph:
  return graphs.from_edges(g.number_of_nodes(), np.array(list(g.edges()), np.int64).reshape(-1, 2),
                           g.is_directed())[0]


def random_graphs(directed: bool):
  yield nx.gnp_random_graph(50, 0.07, seed=1, directed=directed)
  yield nx.gnp_random_graph(80, 0.03, seed=2, directed=directed)  # disconnected
  if directed:
    yield nx.DiGraph(nx.scale_free_graph(120, seed=3))
  else:
    yield nx.powerlaw_cluster_graph(120, 3, 0.05, seed=3)
    yield nx.grid_2d_graph(6, 7)


@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
def test_exact_labels_equal_networkx(directed):
  for g in random_graphs(directed):
    g = nx.convert_node_labels_to_integers(g)
    g.remove_edges_from(nx.selfloop_edges(g))
    expected = nx.betweenness_centrality(g, normalized=False)
    want = [expected[i] for i in range(len(g))]
    np.testing.assert_allclose(graphs.exact_betweenness(graph_of(g)), want, rtol=1e-9, atol=1e-9)
    # sources shared among worker processes: the shares add up to the whole
    got = graphs.exact_betweenness(graph_of(g), workers=2)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
def test_source_dependencies_equal_networkx_subset_betweenness(directed, monkeypatch):
  """The C++ kernel and the NumPy fallback: sum of delta_s(v) over some sources s equals
  networkx's betweenness over pairs (s in sources, t anywhere), on connected and
  disconnected graphs; with every node a source, the estimate is exact betweenness."""
  from sdl.kernels import brandes
  assert brandes.available()
  for g in random_graphs(directed):
    g = nx.convert_node_labels_to_integers(g)
    graph, n = graph_of(g), len(g)
    sources = [0, 3, n // 2, n - 1]
    subset = nx.betweenness_centrality_subset(g, sources, list(g), normalized=False)
    expected = np.array([subset[i] for i in range(n)]) * (1 if directed else 2)
    kernel = graphs.source_dependencies(graph, sources)
    np.testing.assert_allclose(kernel, expected, rtol=1e-9, atol=1e-9)
    one_thread = brandes.source_dependencies(*graphs.csr(graph), np.array(sources), threads=1)
    np.testing.assert_allclose(one_thread, kernel, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(graphs._dependencies_numpy(graph, np.array(sources)),
                               expected, rtol=1e-9, atol=1e-9)
    exact = nx.betweenness_centrality(g, normalized=False)
    np.testing.assert_allclose(graphs.sampled_betweenness(graph, n),
                               [exact[i] for i in range(n)], rtol=1e-9, atol=1e-9)
  monkeypatch.setattr(brandes, "available", lambda: False)  # the fallback behind the API
  np.testing.assert_allclose(graphs.source_dependencies(graph, sources), kernel, rtol=1e-9)


def test_from_edges_drops_and_counts_self_loops_and_repeats():
  edges = np.array([[0, 1], [1, 0], [0, 1], [2, 2], [1, 2]])
  undirected, cleaned = graphs.from_edges(3, edges, directed=False)
  assert (cleaned.self_loops, cleaned.duplicates) == (1, 2)
  assert undirected.edges().tolist() == [[0, 1], [1, 2]] and undirected.num_arcs == 4
  directed, cleaned = graphs.from_edges(3, edges, directed=True)
  assert (cleaned.self_loops, cleaned.duplicates) == (1, 1)
  assert directed.edges().tolist() == [[0, 1], [1, 0], [1, 2]]
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    graphs.from_edges(3, np.array([[0, 3]]), directed=False)


@pytest.mark.parametrize("edges,directed,expected", [
    ([(0, 1), (1, 2), (2, 3)], False, [1, 0, 0, 1]),        # a path: the ends
    ([(0, 1), (0, 2), (0, 3)], False, [0, 1, 1, 1]),        # a star: the leaves
    ([(0, 1), (1, 2), (0, 2), (0, 3)], False, [0, 1, 1, 1]),  # 1, 2: neighbours adjacent
    ([(0, 1), (1, 2), (2, 3), (3, 0)], False, [0, 0, 0, 0]),  # a 4-cycle: nobody
    ([(0, 1), (1, 2), (0, 2)], True, [1, 1, 1]),             # 0 -> 2 shortcuts 0 -> 1 -> 2
    ([(0, 1), (1, 2)], True, [1, 0, 1]),                     # no shortcut: 1 is between
    ([(0, 1), (1, 0)], True, [1, 1]),                        # u -> v -> u is no path
    ([(0, 1), (1, 0), (1, 2)], True, [1, 0, 1]),             # 0 -> 1 -> 2
], ids=["path", "star", "triangle+pendant", "4-cycle", "directed shortcut",
        "directed chain", "2-cycle", "2-cycle+arc"])
def test_never_between_marks_exactly_the_nodes_known_by_hand(edges, directed, expected):
  n = len(expected)
  graph, _ = graphs.from_edges(n, np.array(edges), directed)
  np.testing.assert_array_equal(graphs.never_between(graph), np.array(expected, bool))
  np.testing.assert_array_equal(graphs._never_between_numpy(graph, 32), np.array(expected, bool))


@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
def test_never_between_nodes_have_zero_betweenness(directed):
  marked = zero = 0
  for g in random_graphs(directed):
    graph = graph_of(nx.convert_node_labels_to_integers(g))
    exact = graphs.exact_betweenness(graph)
    never = graphs.never_between(graph)
    assert (exact[never] == 0).all()
    for cap in (2, 32):  # the C++ kernel and the NumPy fallback, with degree caps
      np.testing.assert_array_equal(graphs.never_between(graph, cap),
                                    graphs._never_between_numpy(graph, cap))
    marked, zero = marked + never.sum(), zero + (exact == 0).sum()
  assert marked > 0.5 * zero  # and it finds most of them


@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
def test_message_passing_equals_dense_numpy(directed):
  graph = graph_of(nx.gnp_random_graph(40, 0.1, seed=4, directed=directed))
  h = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
  a = np.zeros((40, 40), np.float32)
  a[graph.senders, graph.receivers] = 1  # A[u, v] = 1 for an arc u -> v
  along = pass_messages(jnp.asarray(h), graph.senders, graph.receivers, along=True)
  against = pass_messages(jnp.asarray(h), graph.senders, graph.receivers, along=False)
  np.testing.assert_allclose(along, a @ h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(against, a.T @ h, rtol=1e-5, atol=1e-5)


def graphs_tuple(graph: graphs.Graph) -> jraph.GraphsTuple:
  return jraph.GraphsTuple(
      nodes=graphs.node_features(graph), edges=None, globals=None,
      senders=graph.senders, receivers=graph.receivers,
      n_node=np.array([graph.num_nodes]), n_edge=np.array([graph.num_arcs]))


@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
def test_padded_batched_graphs_score_as_one_at_a_time(directed):
  parts = [graph_of(nx.gnp_random_graph(n, 0.08, seed=n, directed=directed)) for n in (30, 45)]
  model = BetweennessGNN(width=16, depth=3)
  alone = [graphs_tuple(p) for p in parts]
  params = model.init(jax.random.key(0), alone[0], directed)
  apply = jax.jit(model.apply, static_argnums=2)
  expected = [np.asarray(apply(params, g, directed)) for g in alone]
  padded = jraph.pad_with_graphs(jraph.batch_np(alone), n_node=128, n_edge=512, n_graph=3)
  got = np.asarray(apply(params, padded, directed))
  np.testing.assert_allclose(got[:30], expected[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[30:75], expected[1], rtol=1e-5, atol=1e-6)
  assert np.isfinite(got).all()
  ranked = np.asarray(ranking_scores(jnp.asarray(expected[0]), alone[0]))
  never = graphs.never_between(parts[0])
  assert np.isneginf(ranked[never]).all() and np.isfinite(ranked[~never]).all()


def test_node_features_do_not_depend_on_the_graph_size():
  """Two disjoint copies of a graph: every node's features as in one copy."""
  g = nx.powerlaw_cluster_graph(60, 3, 0.05, seed=5)
  one = graph_of(g)
  two = graph_of(nx.disjoint_union(g, g))
  np.testing.assert_allclose(graphs.node_features(two)[:60], graphs.node_features(one),
                             atol=1e-6)
  np.testing.assert_allclose(graphs.node_features(two)[60:], graphs.node_features(one),
                             atol=1e-6)
  # the estimated-betweenness column: every node a pivot, so exact in both
  one_p, two_p = graphs.node_features(one, pivots=60), graphs.node_features(two, pivots=120)
  assert one_p.shape[1] == graphs.node_features(one).shape[1] + 1
  np.testing.assert_allclose(two_p[:60], one_p, atol=1e-5)
  np.testing.assert_allclose(two_p[60:], one_p, atol=1e-5)


@pytest.mark.parametrize("n,values", [(2, 10**9), (3, 2), (57, 4), (1000, 10**9), (1000, 7),
                                      (5000, 50)])
def test_kendall_tau_b_equals_scipys(n, values):
  rng = np.random.default_rng(n + values)
  x = rng.integers(0, values, n)
  y = x + rng.integers(0, values, n)  # correlated, with ties where values is small
  expected = scipy.stats.kendalltau(x, y).statistic
  assert ranking.kendall_tau_b(x, y) == pytest.approx(expected, abs=1e-12)
  assert ranking.kendall_tau_b(x, -y) == pytest.approx(-expected, abs=1e-12)
  assert np.isnan(ranking.kendall_tau_b(x, np.zeros(n)))


def test_inversions_equal_a_direct_count():
  y = np.random.default_rng(0).integers(0, 20, 300)
  direct = sum(int(y[i] > y[j]) for i in range(300) for j in range(i + 1, 300))
  assert ranking.inversions(y) == direct


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5])
def test_top_k_accuracy_equals_a_direct_set_computation(fraction):
  rng = np.random.default_rng(int(fraction * 100))
  true = rng.integers(0, 30, 400).astype(float)  # many ties, some at the cut-off
  predicted = true + rng.normal(0, 3, 400)
  predicted[::7] = predicted[0]  # ties in the prediction too
  k = max(1, int(fraction * 400))
  by = lambda s: set(sorted(range(400), key=lambda i: (-s[i], i))[:k])  # ties: lower id
  expected = len(by(predicted) & by(true)) / k
  assert ranking.top_k_accuracy(predicted, true, fraction) == expected


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_edge_lists_of_integers_and_of_names_read_alike(tmp_path):
  g = nx.powerlaw_cluster_graph(40, 2, 0.1, seed=6)
  ints = write(tmp_path, "ints", "\n".join(f"{u + 100} {v + 100}" for u, v in g.edges()) + "\n")
  named = write(tmp_path, "named", "# a comment\n\n" + "\n".join(
      f"n{u + 100} n{v + 100}  # edge" for u, v in g.edges()))
  a, names_a, _ = graphs.read_edge_list(ints, directed=False)  # the vectorised path
  b, names_b, _ = graphs.read_edge_list(named, directed=False)  # line by line
  assert sorted(names_a.tolist()) == names_a.tolist() == sorted(int(n[1:]) for n in names_b)
  edges = lambda graph, names: {frozenset((str(names[u]).lstrip("n"), str(names[v]).lstrip("n")))
                                for u, v in graph.edges()}
  assert edges(a, names_a) == edges(b, names_b) == {frozenset((str(u + 100), str(v + 100)))
                                                    for u, v in g.edges()}


@pytest.mark.parametrize("text,message", [
    ("1 2\n2 3 0.5\n", r"bad, line 2: a third column \(a weight\?\): weighted betweenness is "
                       r"not supported"),
    ("1 2\n3\n", r"bad, line 2: 1 field where an edge has two node ids: '3'"),
    ("a b\nc d e f\n", r"bad, line 2: 4 fields"),
    ("", r"bad: no edges"),
    ("# nothing\n\n", r"bad: no edges"),
])
def test_bad_edge_lists_are_one_clear_error_naming_file_and_line(tmp_path, text, message):
  with pytest.raises(graphs.EdgeListError, match=message):
    graphs.read_edge_list(write(tmp_path, "bad", text), directed=False)
  with pytest.raises(graphs.EdgeListError, match=r"missing: no such edge-list file"):
    graphs.read_edge_list(str(tmp_path / "missing"), directed=False)
