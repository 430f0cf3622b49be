"""Activations whose backward pass keeps less than the input.

Autodiff of `flax.linen.leaky_relu` keeps its whole float input for the backward pass,
only to read its sign. In a 3D CNN that input is a convolution's output, the largest
activation of the step (lbann CosmoFlow at 256³: 1 GiB in float32 after conv1), and it
is live at the memory peak. `leaky_relu` here returns the same values and the same
gradients and keeps, by `keep`:

* "signs": the signs packed eight to a byte, 1/32 of the float32 bytes, where nothing
  else keeps the activation (before average pooling or a convolution, whose gradients
  need no activation);
* "output": its output, which has the input's signs (a positive slope), where the next
  op keeps that output for its own gradient anyway (max pooling): no extra bytes and no
  packing pass (packing cost the mlperf CosmoFlow step, all max-pooled, about a fifth of
  its time; `experiments.cosmoflow_step_bench`).
"""
import functools

import jax
import jax.numpy as jnp

_BITS = jnp.arange(8, dtype=jnp.uint8)


KEEPS = ("signs", "output")


def leaky_relu(x, negative_slope: float = 0.01, keep: str = "signs"):
  """`where(x >= 0, x, negative_slope * x)`, as `flax.linen.leaky_relu`; `keep`: what the
  backward pass holds on to (module docstring)."""
  if keep not in KEEPS:
    raise ValueError(f"keep={keep!r}: choose one of {KEEPS}")
  if keep == "output" and negative_slope <= 0:
    raise ValueError(f"keep='output' needs a positive slope to read the input's signs "
                     f"from the output (got {negative_slope}); use keep='signs'")
  return _leaky_relu(x, negative_slope, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _leaky_relu(x, negative_slope, keep):
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


def _leaky_relu_fwd(x, negative_slope, keep):
  y = _leaky_relu(x, negative_slope, keep)
  if keep == "output":
    return y, y
  # With a positive slope y has x's signs; reading them from y leaves x one consumer, so
  # XLA can write y over x in place.
  return y, pack_signs(y if negative_slope > 0 else x)


def _leaky_relu_bwd(negative_slope, keep, kept, g):
  positive = kept >= 0 if keep == "output" else unpack_signs(kept, g.shape[-1])
  return (jnp.where(positive, g, negative_slope * g),)


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)
