"""Losses on a model's outputs, `(outputs, batch) -> (scalar loss, metrics)`, batch means:
the contract of `sdl.train.step`."""
import jax.numpy as jnp
import optax


def sigmoid_xent(outputs, batch):
  """Reconstruction: mean sigmoid cross-entropy of pixel logits against `batch["x"]`."""
  target = batch["x"].reshape(outputs.shape)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, target)), {}


def softmax_xent(outputs, batch):
  """Classification: mean cross-entropy of logits against integer `batch["y"]`, and
  accuracy."""
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, batch["y"]))
  return loss, {"accuracy": jnp.mean(jnp.argmax(outputs, -1) == batch["y"])}
