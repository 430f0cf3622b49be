"""Hand-written collectives for code inside `jax.shard_map`: a (hierarchical, optionally
low-precision) sum over mesh axes, a reduce-scatter, and the device count and index over
several axes.

Where a backend's collective is broken, the way around it is here and only here:
`reduce_scatter` on CPU across processes (gloo) under jax < 0.12 (its docstring).
"""
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

NODE = "node"  # the mesh axis across nodes: with it `all_reduce_sum` is hierarchical


def all_reduce_sum(tree, axis_names: Sequence[str], dtype=None):
  """Every leaf of `tree` summed over the mesh axes `axis_names`, travelling in `dtype`
  (default: each leaf's own) as one flat buffer.

  With `"node"` among several axes the sum is hierarchical: reduce-scatter over the other
  axes (`("node", "local")`: the devices of a node; `("node", "local", "spatial")`: those
  and the spatial shards, which exchange halos every layer and so sit within a node too),
  all-reduce across nodes, all-gather back, so only 1/(devices per node) of the buffer
  crosses the slower network.
  """
  if not axis_names:
    return tree
  axis_names = tuple(axis_names)
  leaves, treedef = jax.tree.flatten(tree)
  flat = jnp.concatenate([jnp.ravel(x).astype(dtype or x.dtype) for x in leaves])
  inner = tuple(a for a in axis_names if a != NODE)
  if NODE in axis_names and inner:
    within = device_count(inner)
    pad = -flat.size % within
    part = reduce_scatter(jnp.pad(flat, (0, pad)), inner if len(inner) > 1 else inner[0])
    part = lax.psum(part, NODE)
    flat = lax.all_gather(part, inner if len(inner) > 1 else inner[0], tiled=True)[:flat.size]
  else:
    flat = lax.psum(flat, tuple(axis_names))
  out, at = [], 0
  for x in leaves:
    out.append(flat[at:at + x.size].reshape(x.shape).astype(x.dtype))
    at += x.size
  return jax.tree.unflatten(treedef, out)


def reduce_scatter(x, axis_name: str | tuple[str, ...]):
  """`lax.psum_scatter(x, axis_name, tiled=True)`: the sum over `axis_name` (one mesh axis
  or several), each device keeping its 1/size of the leading dimension, in row-major order
  of the axes.

  On the CPU backend across processes (gloo), jax 0.10 returns wrong values, silently and
  intermittently, when the group crosses processes and several groups run at once: a
  2 x 2 node x local mesh with `local` across two processes garbled the tail of one
  device's 8 MiB chunk in about one run of three (jax#40830;
  `tests/test_multiprocess.py`). There the sum is an all-reduce, which is right, followed
  by this device's slice: twice the bytes, on a backend where correctness comes first.
  """
  if not _gloo_reduce_scatter_broken():
    return lax.psum_scatter(x, axis_name, tiled=True)
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  part = x.shape[0] // device_count(names)
  return lax.dynamic_slice_in_dim(lax.psum(x, names), device_index(names) * part, part)


@functools.cache
def _gloo_reduce_scatter_broken() -> bool:
  version = tuple(int(p) for p in jax.__version__.split(".")[:2])
  return (version < (0, 12) and jax.process_count() > 1 and jax.default_backend() == "cpu")


def device_count(axis_names: Sequence[str]) -> int:
  """How many devices share the batch over `axis_names` (1 outside `shard_map`)."""
  return math.prod(lax.axis_size(a) for a in axis_names) if axis_names else 1


def device_index(axis_names: Sequence[str]):
  """This device's row-major index over `axis_names`."""
  index = 0
  for name in axis_names:
    index = index * lax.axis_size(name) + lax.axis_index(name)
  return index
