"""How the one train step gets its gradients, and what else an optimiser needs from them.

The train step (`sdl.train.step.make_train_step`) is the same for every optimiser. What
differs is how the gradients are taken: plain reverse mode for SGD or Adam, or a pass that
also records each layer's inputs and output gradients for K-FAC. The step asks a
*gradients function* for them:

    gradients(forward, loss_fn, params, *, rng, phase=None) -> Gradients

`forward(params, extra_variables=None, mutable=()) -> (outputs, mutated)` runs the model on
this step's batch and rng (the step builds it); `extra_variables` are added to the model's
variables and `mutable` names extra collections to return, which is all K-FAC needs to tag
its layers. `loss_fn(outputs) -> (scalar loss, metrics)`. `phase` is the static phase of
this update, for optimisers with periodic work (`sdl.optim.kfac.Phase`); `rng` this step's
key (K-FAC samples its Fisher with it).

`Gradients.tx_args` are handed to `tx.update(...)` as optax extra arguments; `model_state`
is the model's updated state collections (BatchNorm statistics), or {}.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Gradients(NamedTuple):
  loss: jax.Array
  metrics: dict
  grads: Any
  model_state: dict      # updated state collections of the model ({} if none)
  tx_args: dict          # optax extra arguments for this update


Forward = Callable[..., tuple[Any, dict]]
GradientsFn = Callable[..., Gradients]


def split_state(mutated: dict, private: tuple[str, ...] = ()) -> dict:
  """The model's own state collections among `mutated`, without an optimiser's `private`
  ones (K-FAC's sown inputs)."""
  return {k: v for k, v in mutated.items() if k not in private}


def plain(forward: Forward, loss_fn: Callable, params, *, rng=None, phase=None) -> Gradients:
  """Reverse-mode gradients of the loss, nothing else (SGD, Adam, any optax chain)."""
  del rng, phase

  def loss(p):
    outputs, mutated = forward(p)
    value, metrics = loss_fn(outputs)
    return value, (metrics, mutated)
  (value, (metrics, mutated)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return Gradients(value, metrics, grads, split_state(mutated), {})
