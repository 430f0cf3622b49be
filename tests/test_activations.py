"""sdl.ops.activations: the leaky ReLU that keeps packed signs, against flax and numpy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.ops.activations import leaky_relu, pack_signs, unpack_signs


@pytest.mark.parametrize("slope", [0.01, 0.3, 0.0])
def test_leaky_relu_values_and_gradients_equal_flax(slope):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 7, 13)).astype(np.float32)
  x[0, 0, 0, :4] = [0.0, -0.0, 1e-30, -1e-30]  # the sign convention at zero: x >= 0
  g = rng.normal(size=x.shape).astype(np.float32)
  y, vjp = jax.vjp(lambda v: leaky_relu(v, slope), jnp.asarray(x))
  y_ref, vjp_ref = jax.vjp(lambda v: nn.leaky_relu(v, slope), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]),
                                np.asarray(vjp_ref(jnp.asarray(g))[0]))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]),
                                np.where(x >= 0, g, np.float32(slope) * g))


@pytest.mark.parametrize("channels", [1, 8, 13, 16])
def test_signs_pack_eight_to_a_byte_as_numpy_packbits(channels):
  x = np.random.default_rng(channels).normal(size=(4, 6, channels)).astype(np.float32)
  packed = np.asarray(pack_signs(jnp.asarray(x)))
  assert packed.dtype == np.uint8 and packed.shape == (4, 6, -(-channels // 8))
  np.testing.assert_array_equal(packed, np.packbits(x >= 0, axis=-1, bitorder="little"))
  np.testing.assert_array_equal(np.asarray(unpack_signs(jnp.asarray(packed), channels)), x >= 0)


def test_backward_keeps_bytes_not_floats():
  """What the forward hands the backward pass: one uint8 per 8 elements, not x."""
  x = jnp.ones((2, 64, 16))
  _, residuals = jax.vjp(lambda v: leaky_relu(v, 0.01, "signs"), x)
  leaves = [leaf for leaf in jax.tree.leaves(residuals) if hasattr(leaf, "dtype")]
  assert leaves and all(leaf.dtype == jnp.uint8 for leaf in leaves)
  assert sum(leaf.size for leaf in leaves) == x.size // 8


@pytest.mark.parametrize("keep", ["signs", "output"])
def test_both_residuals_give_flax_gradients(keep):
  x = np.random.default_rng(1).normal(size=(2, 4, 4, 12)).astype(np.float32)
  grad = lambda f: np.asarray(jax.grad(lambda v: jnp.sum(jnp.sin(f(v))))(jnp.asarray(x)))
  np.testing.assert_array_equal(grad(lambda v: leaky_relu(v, 0.3, keep)),
                                grad(lambda v: nn.leaky_relu(v, 0.3)))


def test_bad_keep_is_refused():
  with pytest.raises(ValueError, match="choose one of"):
    leaky_relu(jnp.ones(3), 0.1, keep="input")
  with pytest.raises(ValueError, match="positive slope"):
    leaky_relu(jnp.ones(3), 0.0, keep="output")
