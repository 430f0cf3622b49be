"""Hand-written collectives for code inside `jax.shard_map`: a (hierarchical, optionally
low-precision) sum over mesh axes, and the device count and index over several axes."""
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

HIERARCHICAL = ("node", "local")  # axis names that make `all_reduce_sum` hierarchical


def all_reduce_sum(tree, axis_names: Sequence[str], dtype=None):
  """Every leaf of `tree` summed over the mesh axes `axis_names`, travelling in `dtype`
  (default: each leaf's own) as one flat buffer.

  With `("node", "local")` the sum is hierarchical: reduce-scatter within the node,
  all-reduce across nodes, all-gather within the node, so only 1/local of the buffer
  crosses the slower network.
  """
  if not axis_names:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  flat = jnp.concatenate([jnp.ravel(x).astype(dtype or x.dtype) for x in leaves])
  if tuple(axis_names) == HIERARCHICAL:
    local = lax.axis_size("local")
    pad = -flat.size % local
    part = lax.psum_scatter(jnp.pad(flat, (0, pad)), "local", tiled=True)
    part = lax.psum(part, "node")
    flat = lax.all_gather(part, "local", tiled=True)[:flat.size]
  else:
    flat = lax.psum(flat, tuple(axis_names))
  out, at = [], 0
  for x in leaves:
    out.append(flat[at:at + x.size].reshape(x.shape).astype(x.dtype))
    at += x.size
  return jax.tree.unflatten(treedef, out)


def device_count(axis_names: Sequence[str]) -> int:
  """How many devices share the batch over `axis_names` (1 outside `shard_map`)."""
  return math.prod(lax.axis_size(a) for a in axis_names) if axis_names else 1


def device_index(axis_names: Sequence[str]):
  """This device's row-major index over `axis_names`."""
  index = 0
  for name in axis_names:
    index = index * lax.axis_size(name) + lax.axis_index(name)
  return index
