"""The halo exchange and its hand-written VJP against numpy: each shard's slab extended by
its neighbours' planes (zeros at the ends), and the gradient of a weighted sum of the
extended slabs, which numpy accumulates plane by plane from the owner of each copy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sdl.parallel import make_mesh
from sdl.parallel.halo import exchange_halo

SHARDS, PLANES = 4, 3  # 4 shards of 3 planes along dim 1


def numpy_extended(x, low, high):
  """Per shard, `x`'s planes [start - low, start + PLANES + high) (zeros outside)."""
  padded = np.pad(x, [(0, 0), (low, high), (0, 0)])
  return [padded[:, s * PLANES:s * PLANES + low + PLANES + high] for s in range(SHARDS)]


@pytest.mark.parametrize("low,high", [(1, 1), (2, 0), (0, 1), (1, 2), (3, 3)])
def test_exchange_and_its_gradient_equal_numpy(low, high):
  rng = np.random.default_rng(low * 10 + high)
  x = rng.normal(size=(2, SHARDS * PLANES, 5)).astype(np.float32)
  w = rng.normal(size=(SHARDS, 2, low + PLANES + high, 5)).astype(np.float32)
  mesh = make_mesh((SHARDS,), ("depth",), devices=jax.devices()[:SHARDS])

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(None, "depth"), out_specs=P("depth"))
  def extended(x):
    return exchange_halo(x, "depth", 1, low, high)[None]

  def loss(x, w):
    return jnp.sum(extended(x) * w)

  x_dev = jax.device_put(x, NamedSharding(mesh, P(None, "depth")))
  got = np.asarray(extended(x_dev))
  want = numpy_extended(x, low, high)
  np.testing.assert_array_equal(got, np.stack(want))

  # d/dx sum_s <w_s, ext_s(x)>: every copy of a plane adds its weight to that plane.
  grad = np.zeros((2, SHARDS * PLANES + low + high, 5), np.float32)
  for s in range(SHARDS):
    grad[:, s * PLANES:s * PLANES + low + PLANES + high] += w[s]
  grad = grad[:, low:low + SHARDS * PLANES]
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(x_dev, w)), grad, rtol=1e-6,
                             atol=1e-6)
