"""Learning-rate schedules and optimisers from an `optim` config section.

    optim.name          "sgd" (momentum) | "adam" | "kfac" (K-FAC preconditioning, then SGD
                        with `optim.momentum`; its settings in `optim.kfac`, see KFAC_DEFAULTS)
    optim.lr            peak learning rate
    optim.momentum      SGD momentum (Nesterov off), ignored by Adam
    optim.warmup_steps  linear warm-up from 0 to lr
    optim.decay         "cosine" | "linear" | "constant" after warm-up, over train.steps
    optim.weight_decay  decoupled weight decay (AdamW-style for Adam; added to SGD's grads)
    optim.clip_norm     global gradient-norm clip, 0 for none
"""
import contextlib
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import optax

from sdl.optim import gradients as gradients_lib
from sdl.optim import kfac

OPTIMIZERS = ("sgd", "adam", "kfac")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `optim.kfac` fields (each optional) and their defaults: the arguments of `kfac.kfac`
# (factor/comm dtypes by name), plus `fisher` and `likelihood` for `kfac.gradients`.
KFAC_DEFAULTS = dict(
    damping=1e-3, pi_damping=True, relative_damping=False, factor_decay=0.95,
    stats_every=1, inverse_every=20, inversion="eigh", stale_tolerance=0.0,
    factor_dtype="float32", comm_dtype="float32", fallback="identity", kl_clip=1e-3,
    norm_clip=0.0, max_factor_dim=0, wide_conv="fallback", adaptive=False,
    kl_clip_per_layer=False, grad_factors=True, fisher="sampled", likelihood="gaussian")


class Optimizer(NamedTuple):
  """What a trainer needs of its optimiser: the optax transform, the lr schedule, the
  train step's gradients function, the static phase of each update (None: no phases) and
  the layers K-FAC factors ({} for first-order optimisers)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  gradients: gradients_lib.GradientsFn = gradients_lib.plain
  phase_of: Callable[[int], kfac.Phase] | None = None
  layers: dict = {}
DECAYS = ("cosine", "linear", "constant")


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  if optim.decay not in DECAYS:
    raise ValueError(f"optim.decay={optim.decay!r}: choose one of {DECAYS}")
  warmup = min(int(optim.warmup_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  after = {
      "cosine": optax.cosine_decay_schedule(optim.lr, decay_steps),
      "linear": optax.linear_schedule(optim.lr, 0.0, decay_steps),
      "constant": optax.constant_schedule(optim.lr),
  }[optim.decay]
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def kfac_settings(optim) -> dict:
  """`KFAC_DEFAULTS` updated with `optim.kfac`; unknown fields are an error."""
  given = dict(optim.get("kfac") or {})
  unknown = sorted(set(given) - set(KFAC_DEFAULTS))
  if unknown:
    raise ValueError(f"optim.kfac has unknown fields {unknown}: choose from "
                     f"{sorted(KFAC_DEFAULTS)}")
  return {**KFAC_DEFAULTS, **given}


def make_optimizer(optim, total_steps: int, *, model=None, example: tuple = (),
                   axis_names=(), layout=None,
                   transposable=contextlib.nullcontext) -> Optimizer:
  """The optimiser an `optim` config section describes (module docstring).

  K-FAC needs the Flax `model` and an `example` of its positional inputs, to find its
  layers (`kfac.find_layers`); `axis_names` are the batch axes of a `shard_map` step,
  `layout` (`kfac.Layout`) how a GSPMD step splits the batch and depth over its mesh;
  `transposable` is the model's switch for `kfac.gradients` (its docstring).
  """
  schedule = make_schedule(optim, total_steps)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
  if optim.name == "kfac":
    if model is None:
      raise ValueError("optim.name='kfac' finds the model's layers: pass model= and example=")
    k = kfac_settings(optim)
    layers = kfac.select_layers(kfac.find_layers(model, *example), k["max_factor_dim"],
                                k["wide_conv"])
    options = {name: k[name] for name in KFAC_DEFAULTS if name not in ("fisher", "likelihood")}
    options.update(factor_dtype=DTYPES[k["factor_dtype"]], comm_dtype=DTYPES[k["comm_dtype"]])
    pre = kfac.kfac(layers, learning_rate=schedule, axis_names=axis_names, layout=layout,
                    **options)
    parts += [pre, optax.sgd(schedule, momentum=optim.momentum or None)]
    grads = kfac.gradients(layers, fisher=k["fisher"], likelihood=k["likelihood"],
                           axis_names=axis_names, grad_factors=k["grad_factors"],
                           transposable=transposable)
    every = (k["stats_every"], k["inverse_every"])
    return Optimizer(optax.chain(*parts), schedule, grads,
                     lambda i: kfac.phase_at(i, *every), layers)
  if optim.name == "sgd":
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay))
    parts.append(optax.sgd(schedule, momentum=optim.momentum or None))
  elif optim.name == "adam":
    parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay))
  else:
    raise ValueError(f"optim.name={optim.name!r}: choose one of {OPTIMIZERS}")
  return Optimizer(optax.chain(*parts), schedule)
