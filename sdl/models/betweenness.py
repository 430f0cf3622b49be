"""A graph neural network that ranks nodes by betweenness, after GNN-Bet (Maurya, Liu &
Murata, CIKM 2019), on jraph `GraphsTuple`s.

What it keeps of GNN-Bet:
- two branches, one passing messages along the arcs (A: a node hears its successors) and
  one against them (Aᵀ: its predecessors), for the paths leaving and entering a node;
- a node never aggregates its own features (no self-loops);
- the rows of nodes that lie inside no shortest path are zeroed (`sdl.data.graphs.
  never_between`, which extends GNN-Bet's degree rule to simplicial nodes);
- each branch's layers each add a score from a shared MLP; the branches' scores multiply.

What it changes: size-independent inputs (`sdl.data.graphs.node_features`: walk counts
of 1..3 hops each way) instead of one-hot node ids, so one model ranks graphs of any
size; each layer's embedding is L2-normalised per node, as GNN-Bet does, which keeps hub
nodes' sums from swamping the rest, but also erases how many messages arrived: so each
layer's score reads the node's own inputs beside its embedding (`own_features`; without
them the trained model ranked the top 1 % of a 5k-node powerlaw-cluster graph worse than
degree alone). On an undirected graph A = Aᵀ and GNN-Bet's branches
would compute the same thing: here the second branch averages its neighbours' messages
(D⁻¹A) instead of summing them, so the product of the two scores sees both how many
paths arrive and how concentrated they are.

Message passing is a segment sum over the arcs (`sdl.kernels.segment` on CPU for the
direction whose segments are the senders, by which arcs are sorted); padded graphs (jraph's
`pad_with_graphs`) route their padding arcs between padding nodes only, so real nodes
score the same padded or not, batched or alone.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from sdl.kernels import segment


def pass_messages(h: jax.Array, senders: jax.Array, receivers: jax.Array,
                  along: bool) -> jax.Array:
  """Sum over arcs: `along` gives node u the sum of h[v] over its arcs u -> v (A h, with
  A[u, v] = 1 for an arc u -> v); otherwise node v gets h[u] over arcs u -> v (Aᵀ h).
  Arcs must be sorted by sender (`sdl.data.graphs.Graph`'s are; jraph's batching and
  padding keep the order), which `along` exploits."""
  if along:
    return segment.gather_segment_sum(h, receivers, senders, h.shape[0])
  return jax.ops.segment_sum(h[senders], receivers, num_segments=h.shape[0])


class BetweennessGNN(nn.Module):
  width: int = 64
  depth: int = 5
  mean_second_branch: bool = True  # undirected graphs: D⁻¹A in the second branch
  own_features: bool = True  # each layer's score also reads the node's own inputs

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple, directed: bool) -> jax.Array:
    """Scores [nodes] (higher: more between). `graph.nodes` is the features array
    (`node_features`), whose last column is 1 where a node can lie inside a path."""
    x = graph.nodes
    keep = x[:, -1:]
    score = nn.Sequential([nn.Dense(self.width), nn.relu, nn.Dense(1)], name="score")
    branches = []
    for b, along in enumerate((True, False)):
      mean = self.mean_second_branch and not directed and b == 1
      if mean:
        degree = pass_messages(jnp.ones_like(keep), graph.senders, graph.receivers, along)
      h = nn.Dense(self.width, name=f"embed{b}")(x)
      total = jnp.zeros(x.shape[:1], x.dtype)
      for layer in range(self.depth):
        m = pass_messages(h, graph.senders, graph.receivers, along if directed else True)
        if mean:
          m = m / jnp.maximum(degree, 1.0)
        h = nn.relu(nn.Dense(self.width, name=f"branch{b}_layer{layer}")(m * keep))
        h = h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-6)
        total = total + score(jnp.concatenate([h, x], -1) if self.own_features else h)[:, 0]
      branches.append(total)
    return branches[0] * branches[1]


def ranking_scores(scores: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
  """Scores for ranking: nodes inside no shortest path (exact betweenness 0) last."""
  return jnp.where(graph.nodes[:, -1] > 0, scores, -jnp.inf)
