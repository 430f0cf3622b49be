"""Train state and the jitted step `(state, batch) -> (state, metrics)`."""
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array         # uint32[2] raw key; per-step keys are fold_in(rng, step)


# loss_fn(params, batch, rng, train) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, dict, jax.Array, bool], tuple[jax.Array, dict]]


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """The pure step; the caller jits it with shardings and donation."""
  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return step


def make_eval_step(loss_fn: LossFn):
  def step(params, batch: dict) -> dict:
    loss, metrics = loss_fn(params, batch, jnp.zeros((2,), jnp.uint32), False)
    return {**metrics, "loss": loss}
  return step
