"""The depth-folded 3D convolution equals the native op, alone and under spatial sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.models import conv
from sdl.parallel import Partitioner, make_mesh
from sdl.parallel.sharding import VOLUME_AXES

DATA_PARALLEL = ("batch", None, None, None, None)


def case(seed, shape, kernel_shape):
  kx, kk = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kx, shape, jnp.float32),
          jax.random.normal(kk, kernel_shape, jnp.float32) / np.sqrt(np.prod(kernel_shape[:4])))


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def loss_and_grads(fn, x, k):
  def loss(x, k):
    y = fn(x, k)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, k)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3, 3), (1, 1, 1), ((1, 1),) * 3),
    ((3, 3, 3), (2, 2, 2), ((1, 1),) * 3),   # lbann's strided conv4
    ((1, 1, 1), (1, 1, 1), ((0, 0),) * 3),
    ((3, 5, 3), (1, 2, 1), ((0, 0), (2, 2), (1, 1))),
    ((2, 2, 2), (2, 2, 2), ((0, 0),) * 3),
])
def test_folded_equals_native_forward_and_gradients(kernel, strides, padding):
  x, k = case(0, (2, 8, 12, 10, 3), (*kernel, 3, 5))
  native = lambda x, k: conv.conv3d_native(x, k, strides, padding)
  folded = lambda x, k: conv.conv3d_folded(x, k, strides, padding)
  (ln, gn), (lf, gf) = loss_and_grads(native, x, k), loss_and_grads(folded, x, k)
  assert rel_err(folded(x, k), native(x, k)) < 1e-5
  assert abs(float(lf - ln)) / abs(float(ln)) < 1e-5
  for a, b in zip(gf, gn):
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("mesh_shape,axes", [
    ((1, 8), ("data", "spatial")), ((2, 4), ("data", "spatial")),
    ((4, 2), ("data", "spatial")), ((2, 2, 2), ("data", "spatial", "spatial_h"))])
@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2)])
def test_sharded_folded_equals_single_device_native(mesh_shape, axes, strides):
  part = Partitioner.create(make_mesh(mesh_shape, axes))
  hlo = sharded_matches_native(part, *case(1, (4, 16, 8, 6, 4), (3, 3, 3, 4, 6)), strides)
  # The fold stays local: halos move by collective-permute, activations are never gathered.
  assert "collective-permute" in hlo and "all-gather" not in hlo


def sharded_matches_native(part, x, k, strides=(1, 1, 1)) -> str:
  """The CPU lowering on `part`'s mesh against XLA's native op on one device: output,
  loss and both gradients within 1e-5. Returns the compiled gradient's HLO."""
  x = jax.device_put(x, part.sharding(VOLUME_AXES))
  padding = ((1, 1),) * 3
  native = lambda x, k: conv.conv3d_native(x, k, strides, padding)
  sharded = lambda x, k: conv.conv3d_folded(x, k, strides, padding, part, VOLUME_AXES)
  (ln, gn), (ls, gs) = loss_and_grads(native, x, k), loss_and_grads(sharded, x, k)
  assert rel_err(jax.jit(sharded)(x, k), native(x, k)) < 1e-5
  assert abs(float(ls - ln)) / abs(float(ln)) < 1e-5
  for a, b in zip(gs, gn):
    assert rel_err(a, b) < 1e-5
  return jax.jit(jax.grad(lambda x, k: jnp.sum(sharded(x, k) ** 2), argnums=(0, 1))).lower(
      x, k).compile().as_text()


def test_sharded_kernel_gradient_in_chunks_equals_single_device(monkeypatch):
  # At real sizes the per-shard kernel gradient runs as a `scan` over chunks inside
  # `shard_map`; tiny tests take the one-chunk path unless the budget is forced down.
  monkeypatch.setattr(conv, "KERNEL_GRADIENT_CHUNK_BYTES", 1)
  part = Partitioner.create(make_mesh((2, 4), ("data", "spatial")))
  x, k = case(2, (4, 16, 8, 6, 4), (3, 3, 3, 4, 6))
  x = jax.device_put(x, part.sharding(VOLUME_AXES))
  padding = ((1, 1),) * 3
  native = lambda x, k: conv.conv3d_native(x, k, (1, 1, 1), padding)
  sharded = lambda x, k: conv.conv3d_folded(x, k, (1, 1, 1), padding, part, VOLUME_AXES)
  for a, b in zip(loss_and_grads(sharded, x, k)[1], loss_and_grads(native, x, k)[1]):
    assert rel_err(a, b) < 1e-5


def test_data_parallel_layout_and_module_params_match_flax_conv():
  part = Partitioner.create(make_mesh((4, 2), ("data", "spatial")))
  x, _ = case(2, (4, 8, 8, 8, 3), (3, 3, 3, 3, 4))
  layer = conv.Conv3D(4, lowering="folded", partitioner=part, logical=DATA_PARALLEL)
  params = layer.init(jax.random.PRNGKey(0), x)
  import flax.linen as nn  # noqa: PLC0415
  reference = nn.Conv(4, (3, 3, 3), padding=((1, 1),) * 3)
  ref_params = reference.init(jax.random.PRNGKey(0), x)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
  y = jax.jit(layer.apply)(params, jax.device_put(x, part.sharding(DATA_PARALLEL)))
  assert rel_err(y, reference.apply(ref_params, x)) < 1e-5
  assert conv.default_lowering("cpu") == "folded" and conv.default_lowering("gpu") == "native"
  assert conv.default_lowering("tpu") == "native"


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (1, 2)])
@pytest.mark.parametrize("budget", [1, 3000, 1 << 30])  # chunks of 1 image, of 2, whole batch
def test_kernel_gradient_in_chunks_equals_numpy(monkeypatch, strides, budget):
  """The chunked per-tap GEMMs against a direct numpy sum over positions and taps."""
  monkeypatch.setattr(conv, "KERNEL_GRADIENT_CHUNK_BYTES", budget)
  rng = np.random.default_rng(sum(strides))
  b, h, w, c, o, kh, kw = 6, 7, 8, 3, 4, 3, 2
  (sh, sw) = strides
  h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  dy = rng.normal(size=(b, h_out, w_out, o)).astype(np.float32)
  want = np.zeros((kh, kw, c, o))
  for i in range(kh):
    for j in range(kw):
      view = x[:, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw]
      want[i, j] = np.einsum("bhwc,bhwo->co", view.astype(np.float64), dy)
  got = conv.kernel_gradient(jnp.asarray(x), jnp.asarray(dy), (kh, kw), strides)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(lambda x, dy: conv.kernel_gradient(x, dy, (kh, kw), strides)).lower(
      x, dy).as_text()
  assert ("while" in hlo) == (budget < 1 << 30)  # chunked: a scan over image groups


def test_tiny_planes_use_one_gemm_and_equal_native():
  """Output planes of up to 4 x 4 (lbann's 2³ and 4³ layers) go through `patches_gemm`:
  same values and gradients as the native op, on one device and depth-split with halos;
  8 x 8 planes stay folded."""
  padding = ((1, 1),) * 3
  native = lambda x, k: conv.conv3d_native(x, k, (1, 1, 1), padding)
  folded = lambda x, k: conv.conv3d_folded(x, k, (1, 1, 1), padding)
  for seed, side in ((2, 2), (4, 4), (5, 8)):
    x, k = case(seed, (2, 4, side, side, 6), (3, 3, 3, 6, 5))
    (ln, gn), (lf, gf) = loss_and_grads(native, x, k), loss_and_grads(folded, x, k)
    assert abs(float(lf - ln)) / abs(float(ln)) < 1e-5
    for a, b in zip(gf, gn):
      assert rel_err(a, b) < 1e-5
    hlo = jax.jit(folded).lower(x, k).compile().as_text()
    assert ("convolution(" in hlo) == (side * side > conv.GEMM_MAX_PLANE)

  part = Partitioner.create(make_mesh((2, 4), ("data", "spatial")))
  x, k = case(3, (4, 16, 2, 2, 3), (3, 3, 3, 3, 4))
  sharded = lambda x, k: conv.conv3d_folded(x, k, (1, 1, 1), padding, part, VOLUME_AXES)
  x = jax.device_put(x, part.sharding(VOLUME_AXES))
  (ln, gn), (ls, gs) = loss_and_grads(native, x, k), loss_and_grads(sharded, x, k)
  assert abs(float(ls - ln)) / abs(float(ln)) < 1e-5
  for a, b in zip(gs, gn):
    assert rel_err(a, b) < 1e-5
