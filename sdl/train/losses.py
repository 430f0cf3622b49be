"""Losses on a model's outputs, `(outputs, batch) -> (scalar loss, metrics)`, batch means:
the contract of `sdl.train.step`."""
import itertools

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


def permutation_free_bce(logits, labels, mask):
  """EEND's permutation-free loss (Fujita et al. 2019, eq. 4): per example, the mean
  binary cross-entropy of speaker logits against the labels under the speaker permutation
  that fits best.

  logits, labels: [batch, ..., speakers]; mask: [batch, ...], 1 on frames that count.
  Returns (mean loss over the batch, best permutation per example as indices into
  `permutations(speakers)` order, [batch] int).
  """
  speakers = logits.shape[-1]
  perms = jnp.asarray(list(itertools.permutations(range(speakers))))  # [perms, speakers]
  permuted = labels[..., perms]  # [batch, ..., perms, speakers]
  xent = optax.sigmoid_binary_cross_entropy(logits[..., None, :], permuted).mean(-1)
  m = mask.reshape(mask.shape[0], -1)
  per_perm = (xent.reshape(xent.shape[0], -1, perms.shape[0]) * m[..., None]).sum(1)
  per_perm = per_perm / jnp.maximum(m.sum(1, keepdims=True), 1.0)  # [batch, perms]
  return per_perm.min(-1).mean(), per_perm.argmin(-1)
