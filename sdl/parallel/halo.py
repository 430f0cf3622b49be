"""Halo exchange for hand-partitioned spatial ops (inside `jax.shard_map`).

GSPMD inserts halo exchanges itself for the native convolution. Lowerings that reshape
the volume (the depth fold of `sdl.models.conv`) must run per shard instead, or the
partitioner gathers whole activations; they fetch their halos here, with one
`ppermute` per direction: the last `low` planes of each shard go to the next shard, the
first `high` planes to the previous one. Shards at the ends of the volume receive zeros,
which is the convolution's zero padding there.
"""
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
  before, after = halo_planes(x, axis_name, dim, low, high)
  parts = [p for p in (before, x, after) if p is not None]
  return jnp.concatenate(parts, axis=dim) if len(parts) > 1 else x


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
