"""Train state and the one jitted step `(state, batch, phase=None) -> (state, metrics)`.

Every optimiser runs through `make_train_step`. What differs between them is the gradients
function (`sdl.optim.gradients`: plain reverse mode, or K-FAC's tagged pass, which hands the
transform its layer statistics as optax extra arguments) and, for optimisers with periodic
work, the static `phase` of each update (`sdl.optim.kfac.Phase`).

The contracts:
  `Model`    how the step calls a Flax module on a batch: positional inputs taken from the
             batch, keyword arguments for training or evaluation (rngs, `train=`), and the
             state collections it updates while training (`batch_stats`).
  loss_fn    `(outputs, batch) -> (scalar loss, dict of metrics)`, a mean over the batch.
"""
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdl.optim import gradients as gradients_lib
from sdl.parallel.collectives import all_reduce_sum, device_count


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array         # uint32[2] raw key; per-step keys are fold_in(rng, step)
  model_state: Any = flax.struct.field(default_factory=dict)  # e.g. {"batch_stats": ...}
  # bool scalar, sticky: False once any update saw a non-finite loss, gradient or state.
  # The loop reads it before every save, so that no NaN ever reaches a checkpoint.
  finite: jax.Array = flax.struct.field(default_factory=lambda: jnp.array(True))


LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]


def _no_kwargs(rng, train):
  del rng, train
  return {}


@dataclasses.dataclass(frozen=True)
class Model:
  """A Flax module as the train step calls it (module docstring)."""
  module: nn.Module
  inputs: Callable[[dict], tuple] = lambda batch: (batch["x"],)
  kwargs: Callable[[jax.Array | None, bool], dict] = _no_kwargs  # (rng, train) -> kwargs
  state_collections: tuple[str, ...] = ()

  def init(self, key, batch) -> tuple[Any, dict]:
    """(params, model state) from the shapes of `batch` (arrays or ShapeDtypeStructs)."""
    variables = self.module.init(key, *self.inputs(batch), **self.kwargs(None, False))
    return variables["params"], {k: variables[k] for k in self.state_collections}

  def apply(self, variables: dict, batch: dict, rng, train: bool, mutable: Sequence[str] = ()):
    """`(outputs, mutated collections)`; training also returns the state collections."""
    mutable = [*mutable, *(self.state_collections if train else ())]
    out = self.module.apply(variables, *self.inputs(batch), mutable=mutable or False,
                            **self.kwargs(rng, train))
    return out if mutable else (out, {})

  def forward(self, model_state: dict, batch: dict, rng, train: bool = True):
    """The `forward(params, extra_variables=None, mutable=())` of a gradients function."""
    def forward(params, extra=None, mutable=()):
      variables = {"params": params, **model_state, **(extra or {})}
      return self.apply(variables, batch, rng, train, mutable)
    return forward


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def all_finite(*trees) -> jax.Array:
  """One bool scalar: every floating-point value in `trees` is finite."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else (
      jnp.array(True))


def make_train_step(model: Model, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    gradients: gradients_lib.GradientsFn = gradients_lib.plain,
                    mesh=None, batch_axes: Sequence[str] = (), grad_dtype=None,
                    skip_nonfinite: bool = False):
  """The pure step `(state, batch, phase=None) -> (state, metrics)`; the caller jits it
  (with the phase static, `static_argnums=2`, where the optimiser has phases; positional,
  as jit takes no keyword arguments with `in_shardings`), with shardings and
  donation.

  Without `batch_axes` the step is one SPMD program: XLA partitions it from the shardings
  of its inputs (the trainer's plan), and statistics such as BatchNorm's are over the
  global batch. With `mesh` and `batch_axes` it runs per device in `shard_map`, the batch
  split over `batch_axes` and everything else replicated, for optimisers that write their
  own collectives (K-FAC's factor sums and split inverses): gradients are averaged in
  `grad_dtype` (bf16 halves the traffic), loss, metrics and model state are averaged too.

  Every step checks that its loss, gradients and updated state are finite. By default a
  non-finite update clears the state's sticky `finite` flag (the loop then refuses to save
  and stops). With `skip_nonfinite` such an update is not applied: the state keeps its
  values, the step counter moves on (the next batch comes), and `metrics["skipped_updates"]`
  is 1; the other metrics of a skipped step are 0, so the loop can average over the rest.
  """
  batch_axes = tuple(batch_axes)

  def local_step(state: TrainState, batch: dict, phase=None):
    rng = jax.random.fold_in(state.rng, state.step)
    forward = model.forward(state.model_state, batch, rng, train=True)
    g = gradients(forward, lambda outputs: loss_fn(outputs, batch), state.params, rng=rng,
                  phase=phase)
    grads, loss, metrics, model_state = g.grads, g.loss, g.metrics, g.model_state
    if batch_axes:
      size = device_count(batch_axes)
      grads = jax.tree.map(lambda x: x / size, all_reduce_sum(grads, batch_axes, grad_dtype))
      loss, metrics = lax.pmean(loss, batch_axes), lax.pmean(metrics, batch_axes)
      model_state = lax.pmean(model_state, batch_axes)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **g.tx_args)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads)}
    if not state.model_state:
      model_state = state.model_state
    ok = all_finite(loss, grads, params, opt_state, model_state)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      params, opt_state, model_state = (keep(params, state.params),
                                        keep(opt_state, state.opt_state),
                                        keep(model_state, state.model_state))
      metrics = {k: jnp.where(ok, v, jnp.zeros_like(v)) for k, v in metrics.items()}
      metrics["skipped_updates"] = 1 - ok.astype(jnp.float32)
      finite = state.finite
    else:
      finite = jnp.logical_and(state.finite, ok)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        model_state=model_state, finite=finite)
    return new, metrics

  if not batch_axes:
    return local_step
  if mesh is None:
    raise ValueError("make_train_step(batch_axes=...) runs in shard_map: pass the mesh")
  batch_sharding = NamedSharding(mesh, P(batch_axes))
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  # Explicit meshes need the batch already laid out as in_specs says (a reshard in the type
  # system); under Auto axes a sharding constraint does the same.
  lay_out = jax.reshard if explicit else lax.with_sharding_constraint

  def step(state, batch, phase=None):
    sharded = jax.shard_map(lambda s, b: local_step(s, b, phase), mesh=mesh,
                            in_specs=(P(), P(batch_axes)), out_specs=(P(), P()),
                            check_vma=False)
    return sharded(state, jax.tree.map(lambda x: lay_out(x, batch_sharding), batch))
  return step


def make_eval_step(model: Model, loss_fn: LossFn):
  """`(params, model_state, batch) -> metrics` (with "loss"), the model in eval mode."""
  def step(params, model_state, batch: dict) -> dict:
    outputs, _ = model.apply({"params": params, **model_state}, batch, None, train=False)
    loss, metrics = loss_fn(outputs, batch)
    return {**metrics, "loss": loss}
  return step


def make_batch_stats_step(model: Model, momentum: float):
  """`(params, model_state, batch) -> model_state` holding this batch's own batch-norm
  statistics: a training-mode forward from zeroed statistics, whose running update
  `momentum · 0 + (1 - momentum) · batch` is divided by `1 - momentum`. Dropout gets a
  fixed key; it only matters here if it comes before a batch norm."""
  def step(params, model_state, batch: dict):
    zeros = jax.tree.map(jnp.zeros_like, model_state)
    _, new = model.apply({"params": params, **zeros}, batch, jax.random.PRNGKey(0), train=True)
    return jax.tree.map(lambda x: x / (1 - momentum), new)
  return step


def pool_batch_stats(per_batch: Sequence[dict]) -> dict:
  """Population statistics from equal-sized batches' flax batch-norm statistics (dicts with
  `mean` and `var`, the biased per-batch variance): the mean of the means, and the mean
  variance plus the spread of the batch means about it (not E[x²] - E[x]², which cancels
  to noise in float32 where features vary little between samples)."""
  first = per_batch[0]
  if isinstance(first, dict) and set(first) == {"mean", "var"}:
    means = jnp.stack([b["mean"] for b in per_batch])
    mean = means.mean(0)
    var = jnp.stack([b["var"] for b in per_batch]).mean(0) + ((means - mean) ** 2).mean(0)
    return {"mean": mean, "var": var}
  return {key: pool_batch_stats([b[key] for b in per_batch]) for key in first}


def init_state(model: Model, tx, batch, seed: int) -> TrainState:
  """A fresh state: params and model state from `PRNGKey(seed)`, the step rng from
  `fold_in(key, 1)` (jit it with `out_shardings` to create it in place)."""
  key = jax.random.PRNGKey(seed)
  params, model_state = model.init(key, batch)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                    jax.random.fold_in(key, 1), model_state, jnp.array(True))
