"""Learning-rate schedules and optimisers from an `optim` config section.

    optim.name          "sgd" (momentum) | "adam"
    optim.lr            peak learning rate
    optim.momentum      SGD momentum (Nesterov off), ignored by Adam
    optim.warmup_steps  linear warm-up from 0 to lr
    optim.decay         "cosine" | "linear" | "constant" after warm-up, over train.steps
    optim.weight_decay  decoupled weight decay (AdamW-style for Adam; added to SGD's grads)
    optim.clip_norm     global gradient-norm clip, 0 for none
"""
import optax

OPTIMIZERS = ("sgd", "adam")
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


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(optim, total_steps)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
  if optim.name == "sgd":
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay))
    parts.append(optax.sgd(schedule, momentum=optim.momentum or None))
  elif optim.name == "adam":
    parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay))
  else:
    raise ValueError(f"optim.name={optim.name!r}: choose one of {OPTIMIZERS}")
  return optax.chain(*parts), schedule
