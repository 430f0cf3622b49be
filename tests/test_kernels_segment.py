"""The sorted segment-sum kernel (`sdl.kernels.segment`) against numpy's `add.at`, its
gradient against XLA's, and its refusal of unsorted segments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.kernels import segment


def case(rows, arcs, width, segments, seed=0):
  rng = np.random.default_rng(seed)
  s = np.sort(rng.integers(0, segments, arcs)).astype(np.int32)
  g = rng.integers(0, rows, arcs).astype(np.int32)
  h = rng.normal(size=(rows, width)).astype(np.float32)
  return h, g, s


def reference(h, g, s, segments):
  out = np.zeros((segments, h.shape[1]), np.float64)
  np.add.at(out, s, h[g].astype(np.float64))
  return out


@pytest.mark.parametrize("rows,arcs,width,segments", [
    (50, 400, 64, 50),      # a graph: as many segments as nodes
    (300, 5000, 5, 2100),   # a width that is no vector multiple; many empty segments
    (10, 0, 16, 7),         # no arcs: zeros
    (4000, 30000, 33, 4000),  # enough rows for several threads
])
def test_kernel_equals_numpy(rows, arcs, width, segments):
  assert segment.use_kernel(), "the kernel should build on CPU here"
  h, g, s = case(rows, arcs, width, segments)
  got = jax.jit(segment.gather_segment_sum, static_argnums=3)(h, g, s, segments)
  np.testing.assert_allclose(got, reference(h, g, s, segments), rtol=1e-5, atol=1e-5)


def test_gradient_and_switching_off_equal_xla(monkeypatch):
  h, g, s = case(200, 1500, 8, 200, seed=1)
  w = np.random.default_rng(2).normal(size=(200, 8)).astype(np.float32)
  loss = lambda h: (jnp.tanh(segment.gather_segment_sum(h, g, s, 200)) * w).sum()
  xla = lambda h: (jnp.tanh(jax.ops.segment_sum(h[g], s, num_segments=200)) * w).sum()
  np.testing.assert_allclose(jax.grad(loss)(h), jax.grad(xla)(h), rtol=1e-5, atol=1e-5)
  monkeypatch.setenv("SDL_SEGMENT_KERNEL", "off")
  assert not segment.use_kernel()
  np.testing.assert_allclose(segment.gather_segment_sum(h, g, s, 200),
                             reference(h, g, s, 200), rtol=1e-5, atol=1e-5)


def test_unsorted_or_out_of_range_segments_are_an_error():
  h, g, s = case(20, 100, 4, 20, seed=3)
  for bad in (s[::-1].copy(), np.where(np.arange(100) == 99, 20, s).astype(np.int32)):
    with pytest.raises(Exception, match="segments must be sorted and every index in range"):
      jax.block_until_ready(segment.gather_segment_sum(h, g, bad, 20))
