"""The generic loop: resume, step, log, evaluate, checkpoint, plot.

Every piece that depends on the experiment comes in as a function, so a trainer for a new
model family only builds its model, data and loss (see `sdl/train/cosmoflow.py`).
"""
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from sdl.train.checkpoint import Checkpointer
from sdl.train.metrics import MetricWriter, Progress, is_writer
from sdl.train.plots import plot_metrics
from sdl.train.state import TrainState


def fit(*, workdir: str, config, init_state: Callable[[], TrainState], abstract_state: TrainState,
        train_step: Callable, get_batch: Callable[[int], dict],
        evaluate: Callable[[object], dict] | None, schedule: Callable[[int], float],
        hooks: Sequence[Callable[[int, TrainState], None]] = ()) -> TrainState:
  """Train for `config.train.steps` steps, resuming from the latest checkpoint in `workdir`.

  `train_step` is the jitted `(state, batch) -> (state, metrics)`; `get_batch(step)` returns
  the global batch of `step` as sharded jax arrays; `evaluate(params)` returns eval metrics.
  `hooks(step, state)` run after every step (profilers, tests that simulate a crash).
  """
  train = config.train
  os.makedirs(workdir, exist_ok=True)
  if is_writer():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), train.checkpoint_every,
                      train.keep_checkpoints)
  state = ckpt.restore(abstract_state)
  if state is None:
    state = init_state()
  else:
    print(f"resumed from {workdir}/checkpoints at step {int(state.step)}", flush=True)
  start = int(state.step)
  writer = MetricWriter(workdir, resume_step=start)
  progress = Progress(train.steps, start)
  window = []  # metrics (still on device) of the steps since the last record
  waited = 0.0  # input wait already reported
  try:
    for step in range(start + 1, train.steps + 1):
      t0 = time.perf_counter()
      state, metrics = train_step(state, get_batch(step - 1))
      window.append(metrics)
      if len(window) > 1:
        # At most two steps in flight. With many multi-device steps queued, XLA:CPU's
        # virtual devices (4 on 2 cores) aborted in a collective-permute rendezvous in 4 of
        # 8 demo runs (2026-11-27); a device is still fed one step ahead.
        jax.block_until_ready(window[-2])
      if step == start + 1:
        jax.block_until_ready(metrics)
        print(f"first step (compile + run): {time.perf_counter() - t0:.1f} s", flush=True)
      eval_now = evaluate is not None and (step % train.eval_every == 0 or step == train.steps)
      if eval_now or step % train.log_every == 0 or step == train.steps:
        # Training metrics are means over the steps since the last record, not one noisy step.
        # Summed on the host: small multi-device adds queued between steps could wedge
        # XLA:CPU (see `_host_sums`).
        first, sums = step - len(window) + 1, _host_sums(window)
        record = {"step": step, **scalars(sums, len(window))}
        window = []
        if not math.isfinite(record["loss"]):
          raise FloatingPointError(
              f"loss is {record['loss']} at step {step} (mean of steps {first}-{step}); lower "
              "optim.lr, enable optim.clip_norm, or check the data (last good checkpoint: "
              f"{ckpt.latest_step()})")
        record["lr"] = float(schedule(step - 1))
        if hasattr(get_batch, "wait_seconds"):  # a Prefetcher: exposed input time
          record["input_wait_s"] = get_batch.wait_seconds - waited
          waited = get_batch.wait_seconds
        record["steps_per_sec"] = progress.rate(step)
        if eval_now:
          record.update({f"eval_{k}": v for k, v in evaluate(state.params).items()})
        writer.write(record)
        progress.line(step, record["steps_per_sec"], record)
      ckpt.save(step, state, force=step == train.steps)
      for hook in hooks:
        hook(step, state)
  finally:
    ckpt.close()
  if is_writer():
    print(f"wrote {plot_metrics(workdir)}", flush=True)
  return state


def _host_sums(window: list[dict]) -> dict:
  """Per-key sums of the steps' metrics, computed in numpy after one transfer.

  Not with `jax.tree.map(sum, ...)` on the device arrays: each `+` is then a small
  computation launched on every device while the next step is in flight. On 4 virtual CPU
  devices (2 cores) the demo wedged that way in 4 of 11 runs under load, with sdl's direct
  conv kernel or without it (session 12, 2026-11-28). One device sat in a halo-exchange
  collective-permute while the others' launches of the same step waited on XLA:CPU's
  per-device in-flight semaphore, and Python's thread in such an add; XLA aborted the
  rendezvous after 40 s. With the sums here, nothing but the steps is launched between
  steps (0 of 12 runs under the same load wedged).
  """
  host = jax.device_get(window)
  return {key: np.sum([np.asarray(m[key], np.float64) for m in host], axis=0)
          for key in host[0]}


def scalars(metrics: dict, count: int = 1) -> dict:
  """Metrics (or per-batch sums of them, divided by `count`) as floats for JSON; a vector
  metric `mae_param` becomes `mae_param_0`, `mae_param_1`, ..."""
  out = {}
  for key, total in metrics.items():
    value = np.asarray(total, np.float64) / count
    if value.ndim:
      out.update({f"{key}_{i}": float(v) for i, v in enumerate(value.ravel())})
    else:
      out[key] = float(value)
  return out
