"""Activations whose backward pass keeps less than the input.

Autodiff of `flax.linen.leaky_relu` keeps its whole float input for the backward pass,
only to read its sign. In a 3D CNN that input is a convolution's output, the largest
activation of the step (lbann CosmoFlow at 256³: 1 GiB in float32 after conv1), and it
is live at the memory peak. `leaky_relu` here keeps the signs packed eight to a byte,
1/32 of the float32 bytes, and returns the same values and the same gradients.
"""
import functools

import jax
import jax.numpy as jnp

_BITS = jnp.arange(8, dtype=jnp.uint8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def leaky_relu(x, negative_slope: float = 0.01):
  """`where(x >= 0, x, negative_slope * x)`, as `flax.linen.leaky_relu`."""
  return jnp.where(x >= 0, x, negative_slope * x)


def pack_signs(x):
  """`x >= 0` as bits, eight elements of the last axis to a byte: uint8 `[..., ceil(n/8)]`.

  A sum over the bit positions, so a reduction: XLA does not fold it into the consumer
  (it would for a plain boolean mask, keeping `x` alive to recompute it).
  """
  n = x.shape[-1]
  bits = jnp.pad(x >= 0, [(0, 0)] * (x.ndim - 1) + [(0, -n % 8)])
  bits = bits.reshape(*x.shape[:-1], -1, 8).astype(jnp.uint8)
  return jnp.sum(bits << _BITS, axis=-1, dtype=jnp.uint8)


def unpack_signs(packed, n: int):
  """The booleans `pack_signs` packed, `[..., n]`."""
  bits = (packed[..., None] >> _BITS) & 1
  return bits.reshape(*packed.shape[:-1], -1)[..., :n].astype(bool)


def _leaky_relu_fwd(x, negative_slope):
  y = leaky_relu(x, negative_slope)
  # With a positive slope y has x's signs; reading them from y leaves x one consumer, so
  # XLA can write y over x in place.
  return y, pack_signs(y if negative_slope > 0 else x)


def _leaky_relu_bwd(negative_slope, packed, g):
  positive = unpack_signs(packed, g.shape[-1])
  return (jnp.where(positive, g, negative_slope * g),)


leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)
