"""Halo exchange for hand-partitioned spatial ops (inside `jax.shard_map`).

GSPMD inserts halo exchanges itself for the native convolution. Lowerings that reshape
the volume (the depth fold of `sdl.models.conv`) must run per shard instead, or the
partitioner gathers whole activations; they fetch their halos here, with one
`ppermute` per direction: the last `low` planes of each shard go to the next shard, the
first `high` planes to the previous one. Shards at the ends of the volume receive zeros,
which is the convolution's zero padding there.

The exchange has its own VJP. Autodiff would transpose each halo `slice` into a `pad` of
its cotangent back to the whole shard: two shard-sized buffers of mostly zeros per split
layer, live at the backward pass's memory peak (with them the U-Net's 256³ step at P = 2
took 0.61 of P = 1's memory, without them 0.49). The VJP instead sends the halo cotangents back to the
shards that own those planes, which add them into their edge planes in place.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax


def exchange_halo(x: jax.Array, axis_name: str | None, dim: int, low: int,
                  high: int) -> jax.Array:
  """`x` extended along `dim` by `low` planes before and `high` after.

  With `axis_name` None (the dimension is not split), the planes are zero padding.
  Must be called inside `shard_map` over `axis_name`; every shard needs at least
  `max(low, high)` planes (`sdl.parallel.spatial` checks this before compiling).
  """
  if axis_name is None:
    pad = [(0, 0)] * x.ndim
    pad[dim] = (low, high)
    return jnp.pad(x, pad)
  if not (low or high):
    return x
  return _exchange(x, axis_name, dim, low, high)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _exchange(x, axis_name, dim, low, high):
  before, after = halo_planes(x, axis_name, dim, low, high)
  parts = [p for p in (before, x, after) if p is not None]
  return jnp.concatenate(parts, axis=dim)


def _exchange_fwd(x, axis_name, dim, low, high):
  return _exchange(x, axis_name, dim, low, high), None


def _exchange_bwd(axis_name, dim, low, high, _, g):
  """The transpose of the exchange: own planes' cotangent, plus the cotangents of the
  copies the neighbours hold (the halos they received), sent back and added in place."""
  shards = lax.psum(1, axis_name)
  size = g.shape[dim] - low - high
  dx = lax.slice_in_dim(g, low, low + size, axis=dim)

  def add_planes(dx, planes, start):
    edge = lax.slice_in_dim(dx, start, start + planes.shape[dim], axis=dim)
    return lax.dynamic_update_slice_in_dim(dx, edge + planes, start, axis=dim)

  if low:  # this shard's `before` halo is the previous shard's last `low` planes
    back = lax.ppermute(lax.slice_in_dim(g, 0, low, axis=dim), axis_name,
                        [(i + 1, i) for i in range(shards - 1)])
    dx = add_planes(dx, back, size - low)
  if high:  # and its `after` halo the next shard's first `high` planes
    back = lax.ppermute(lax.slice_in_dim(g, low + size, low + size + high, axis=dim),
                        axis_name, [(i, i + 1) for i in range(shards - 1)])
    dx = add_planes(dx, back, 0)
  return (dx,)


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def halo_planes(x: jax.Array, axis_name: str, dim: int, low: int, high: int):
  """The neighbours' planes alone: (`low` planes of the previous shard or None, `high`
  of the next or None), zeros at the ends of the volume. For ops that use them without
  forming the extended array (`sdl.models.pooling`)."""
  shards = lax.psum(1, axis_name)
  size = x.shape[dim]
  before = after = None
  if low:
    before = lax.ppermute(lax.slice_in_dim(x, size - low, size, axis=dim), axis_name,
                          [(i, i + 1) for i in range(shards - 1)])
  if high:
    after = lax.ppermute(lax.slice_in_dim(x, 0, high, axis=dim), axis_name,
                         [(i + 1, i) for i in range(shards - 1)])
  return before, after
