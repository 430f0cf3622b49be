"""sdl.kernels.conv3d: the direct convolution for few input channels, against float64
numpy sums, against XLA's native op inside a layer, and under spatial sharding."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.kernels import build
from sdl.kernels import conv3d as direct_kernels
from sdl.models import conv
from sdl.parallel import Partitioner, make_mesh
from tests.test_conv import case, loss_and_grads, rel_err, sharded_matches_native


def reference(x, kernel):
  """Valid stride-1 convolution and its kernel gradient's tap sums, in float64."""
  kd, kh, kw = kernel.shape[:3]
  n, d, h, w, _ = x.shape
  out = (d - kd + 1, h - kh + 1, w - kw + 1)
  y = np.zeros((n, *out, kernel.shape[-1]))
  for a in range(kd):
    for b in range(kh):
      for j in range(kw):
        view = x[:, a:a + out[0], b:b + out[1], j:j + out[2]].astype(np.float64)
        y += np.einsum("ndhwc,co->ndhwo", view, kernel[a, b, j].astype(np.float64))
  return y


def reference_kernel_grad(x, dy, kernel_shape):
  kd, kh, kw = kernel_shape[:3]
  out = dy.shape[1:4]
  dk = np.zeros(kernel_shape)
  for a in range(kd):
    for b in range(kh):
      for j in range(kw):
        view = x[:, a:a + out[0], b:b + out[1], j:j + out[2]].astype(np.float64)
        dk[a, b, j] = np.einsum("ndhwc,ndhwo->co", view, dy.astype(np.float64))
  return dk


# (input [N, D, H, W, C] already padded, kernel taps, O): tails of the width tiles (13
# outputs = 12 + 1, 5 = 4 + 1, 20 = 16 + 4), every output-channel block (16, 32, 32 + 16,
# 64), channel blocks of 1-4 and 4 + 2, and width taps other than 3 (1, 2, 5 = 3 + 1 + 1).
CASES = [
    ((2, 5, 4, 15, 4), (3, 3, 3), 32),
    ((1, 4, 6, 7, 1), (3, 3, 3), 16),
    ((1, 3, 3, 22, 3), (2, 1, 3), 48),
    ((2, 4, 5, 6, 6), (3, 3, 2), 64),
    ((1, 6, 4, 9, 2), (1, 2, 5), 16),
    ((1, 3, 3, 4, 4), (1, 1, 1), 32),
]


# STREAM_BYTES: -1 plain stores (as the tiny outputs here get by default), 0 streaming
# stores for every output (as large outputs get).
@pytest.mark.parametrize("stream_bytes", [-1, 0])
@pytest.mark.parametrize("x_shape,taps,features", CASES)
def test_forward_and_kernel_gradient_match_float64_numpy(x_shape, taps, features,
                                                         stream_bytes, monkeypatch):
  monkeypatch.setattr(direct_kernels, "STREAM_BYTES", stream_bytes)
  rng = np.random.default_rng(sum(x_shape) + features)
  x = rng.standard_normal(x_shape).astype(np.float32)
  kernel = rng.standard_normal((*taps, x_shape[-1], features)).astype(np.float32)
  want = reference(x, kernel)
  y = jax.jit(lambda x, k: direct_kernels.forward(x, k))(x, kernel)  # traced anew
  assert y.shape == want.shape
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  dy = rng.standard_normal(want.shape).astype(np.float32)
  dk = jax.jit(lambda x, dy: direct_kernels.kernel_grad(x, dy, kernel.shape))(x, dy)
  want_dk = reference_kernel_grad(x, dy, kernel.shape)
  np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5,
                             atol=1e-5 * np.abs(want_dk).max())


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
  """The kernel is tested on every CPU, also those `use_direct` leaves on XLA."""
  monkeypatch.setenv("SDL_DIRECT_CONV", "on")


def test_wide_vectors_read_from_the_cpu_flags(monkeypatch):
  """AVX-512 (x86) or 512-bit SVE (A64FX) is wide; AVX2 is not, and then "auto" keeps
  every layer on XLA while "on" still takes the kernel."""
  import builtins  # noqa: PLC0415
  real_open = builtins.open

  def fake(cpuinfo, sve_bytes=None):
    def opener(path, *args, **kwargs):
      if path == "/proc/cpuinfo":
        return io.StringIO(cpuinfo)
      if path == "/proc/sys/abi/sve_default_vector_length" and sve_bytes is not None:
        return io.StringIO(f"{sve_bytes}\n")
      return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", opener)
    direct_kernels.wide_vectors.cache_clear()
    return direct_kernels.wide_vectors()

  try:
    assert fake("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n")
    assert not fake("flags\t\t: fpu sse2 avx2 fma\n")
    assert fake("Features\t: fp asimd sve\n", 64)  # A64FX: 512 bits
    assert not fake("Features\t: fp asimd sve\n", 16)  # 128-bit SVE
    assert not fake("Features\t: fp asimd\n")  # NEON only
    f32, s1 = jnp.float32, (1, 1, 1)
    fake("flags\t\t: avx2 fma\n")
    assert direct_kernels.use_direct((3, 3, 3, 4, 32), s1, 128, f32, "cpu")  # "on"
    monkeypatch.setenv("SDL_DIRECT_CONV", "auto")
    assert not direct_kernels.use_direct((3, 3, 3, 4, 32), s1, 128, f32, "cpu")
    fake("flags\t\t: avx2 avx512f\n")
    assert direct_kernels.use_direct((3, 3, 3, 4, 32), s1, 128, f32, "cpu")
    monkeypatch.setenv("SDL_DIRECT_CONV", "maybe")
    with pytest.raises(ValueError, match="SDL_DIRECT_CONV='maybe': give off, on or auto"):
      direct_kernels.available()
  finally:
    monkeypatch.setattr(builtins, "open", real_open)
    direct_kernels.wide_vectors.cache_clear()


def test_use_direct_policy(monkeypatch):
  f32, s1 = jnp.float32, (1, 1, 1)
  use = direct_kernels.use_direct
  assert use((3, 3, 3, 4, 32), s1, 128, f32, "cpu")  # CosmoFlow's first layer
  assert use((3, 3, 3, 1, 16), s1, 4, f32, "cpu")  # few channels: any width
  assert use((3, 3, 3, 32, 64), s1, 64, f32, "cpu")  # long rows, a 0.2 MB kernel
  assert not use((3, 3, 3, 32, 64), s1, 16, f32, "cpu")  # short rows: folded
  assert not use((3, 3, 3, 256, 512), s1, 64, f32, "cpu")  # a 14 MB kernel: folded
  assert not use((3, 3, 3, 4, 32), s1, 128, f32, "gpu")  # XLA's on accelerators
  assert not use((3, 3, 3, 4, 32), s1, 128, f32, "tpu")
  assert not use((3, 3, 3, 4, 32), (2, 2, 2), 64, f32, "cpu")  # stride 1 only
  assert not use((3, 3, 3, 4, 24), s1, 128, f32, "cpu")  # vectors of 16 outputs
  assert not use((3, 3, 3, 4, 32), s1, 128, jnp.bfloat16, "cpu")
  assert direct_kernels.input_grad_direct(32) and not direct_kernels.input_grad_direct(4)
  with direct_kernels.disabled():
    assert not use((3, 3, 3, 4, 32), s1, 128, f32, "cpu")
  assert use((3, 3, 3, 4, 32), s1, 128, f32, "cpu")
  monkeypatch.setenv("SDL_DIRECT_CONV", "off")
  assert not use((3, 3, 3, 4, 32), s1, 128, f32, "cpu")


@pytest.mark.parametrize("x_shape,features,padding,input_grad_direct", [
    ((2, 6, 7, 9, 4), 16, ((1, 1),) * 3, False),            # a first layer
    ((2, 6, 7, 9, 4), 16, ((0, 0), (2, 0), (0, 2)), False),
    ((1, 3, 4, 33, 16), 32, ((1, 1),) * 3, True),           # long rows: input gradient too
    ((1, 4, 3, 32, 16), 16, ((1, 1), (0, 2), (2, 0)), True),
])
def test_layer_takes_the_direct_kernel_and_equals_native(x_shape, features, padding,
                                                         input_grad_direct):
  x, k = case(0, x_shape, (3, 3, 3, x_shape[-1], features))
  native = lambda x, k: conv.conv3d_native(x, k, (1, 1, 1), padding)
  cpu = lambda x, k: conv.conv3d_folded(x, k, (1, 1, 1), padding)
  (ln, gn), (lc, gc) = loss_and_grads(native, x, k), loss_and_grads(cpu, x, k)
  assert rel_err(jax.jit(cpu)(x, k), native(x, k)) < 1e-5
  assert abs(float(lc - ln)) / abs(float(ln)) < 1e-5
  for a, b in zip(gc, gn):  # input and kernel gradients
    assert rel_err(a, b) < 1e-5
  hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(cpu(x, k) ** 2), argnums=(0, 1))).lower(
      x, k).as_text()
  forward_calls = hlo.count(f"@{direct_kernels.FORWARD}(")
  assert forward_calls == (2 if input_grad_direct else 1)
  assert direct_kernels.KERNEL_GRAD in hlo
  # A first layer's input gradient is unused: XLA drops it, only the two calls remain.
  first = jax.jit(jax.grad(lambda k: jnp.sum(cpu(x, k) ** 2))).lower(k).compile().as_text()
  assert "convolution(" not in first


@pytest.mark.parametrize("mesh_shape,axes", [
    ((2, 4), ("data", "spatial")), ((2, 2, 2), ("data", "spatial", "spatial_h"))])
def test_sharded_direct_layer_equals_single_device_native(mesh_shape, axes):
  """Per shard inside `shard_map`, after the halo exchange; the kernel gradient is summed
  over every axis the input is split over."""
  part = Partitioner.create(make_mesh(mesh_shape, axes))
  # a first layer, then long rows (the input gradient goes direct too, per shard)
  for x, k in (case(1, (4, 16, 8, 6, 3), (3, 3, 3, 3, 16)),
               case(2, (2, 8, 4, 32, 16), (3, 3, 3, 16, 16))):
    hlo = sharded_matches_native(part, x, k)
    assert direct_kernels.FORWARD in hlo and direct_kernels.KERNEL_GRAD in hlo
    assert "collective-permute" in hlo and "all-gather" not in hlo


def test_host_built_kernels_are_keyed_by_the_cpu(monkeypatch, tmp_path):
  monkeypatch.setenv("SDL_KERNEL_CACHE", str(tmp_path))
  first = build.library("conv3d.cc", host=True)
  assert build.library("conv3d.cc", host=True) == first  # cached
  monkeypatch.setattr(build, "host_cpu", lambda: "another node type")
  assert build.library("conv3d.cc", host=True) != first  # built again for that CPU
