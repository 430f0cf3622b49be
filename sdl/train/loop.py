"""The generic loop: resume, step, log, evaluate, checkpoint, plot.

Every piece that depends on the experiment comes in as a function or from config, so a
trainer for a new model family only builds its model, data and loss (see
`experiments/trainers/cosmoflow.py`). From config it reads `train.steps`, `log_every`,
`eval_every`, `checkpoint_every`, `keep_checkpoints`, and (optional) `log.shown` (the
metrics on the progress line) and `log.plot_train` / `log.plot_eval` (the series in the
plot).
"""
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from sdl import process
from sdl.train.checkpoint import Checkpointer
from sdl.train.evaluate import scalars
from sdl.train.metrics import MetricWriter, Progress, is_writer
from sdl.train.plots import plot_metrics
from sdl.train.step import TrainState

SHOWN = ("loss", "lr", "eval_loss")
PLOT_TRAIN, PLOT_EVAL = ("loss",), ("eval_loss",)


def write_config(workdir: str, config) -> None:
  """`workdir/config.json`: the resolved config, plus the process settings applied
  (`sdl.process.applied()`) under `process.applied`."""
  if not is_writer():
    return
  resolved = json.loads(config.to_json_best_effort())
  resolved.setdefault("process", {})["applied"] = process.applied()
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, "config.json"))


def fit(*, workdir: str, config, init_state: Callable[[], TrainState], abstract_state: TrainState,
        train_step: Callable, get_batch: Callable[[int], dict],
        evaluate: Callable[[TrainState], dict] | None, schedule: Callable[[int], float],
        phase_of: Callable[[int], object] | None = None,
        hooks: Sequence[Callable[[int, TrainState], None]] = ()) -> TrainState:
  """Train for `config.train.steps` steps, resuming from the latest checkpoint in `workdir`.

  `train_step` is the jitted `(state, batch, phase=...) -> (state, metrics)`; `phase_of(i)`
  gives update `i`'s static phase (K-FAC's; None: the step takes no phase);
  `get_batch(step)` returns the global batch of `step` as sharded jax arrays;
  `evaluate(state)` returns eval metrics. `hooks(step, state)` run after every step
  (profilers, tests that simulate a crash).
  """
  train = config.train
  log = config.get("log") or {}
  os.makedirs(workdir, exist_ok=True)
  write_config(workdir, config)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), train.checkpoint_every,
                      train.keep_checkpoints)
  state = ckpt.restore(abstract_state)
  if state is None:
    state = init_state()
  else:
    print(f"resumed from {workdir}/checkpoints at step {int(state.step)}", flush=True)
  start = int(state.step)
  writer = MetricWriter(workdir, resume_step=start)
  progress = Progress(train.steps, start, shown=tuple(log.get("shown", SHOWN)))
  window = []  # metrics (still on device) of the steps since the last record
  waited = 0.0  # input wait already reported
  try:
    for step in range(start + 1, train.steps + 1):
      t0 = time.perf_counter()
      batch = get_batch(step - 1)
      if phase_of is None:
        state, metrics = train_step(state, batch)
      else:
        state, metrics = train_step(state, batch, phase_of(step - 1))
      window.append(metrics)
      if len(window) > 1:
        # At most two steps in flight: with many multi-device steps queued, XLA:CPU's
        # virtual devices (4 on 2 cores) could abort in a collective-permute rendezvous
        # (docs/design/host-metric-sums.md); a device is still fed one step ahead.
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
          record.update({f"eval_{k}": v for k, v in evaluate(state).items()})
        writer.write(record)
        progress.line(step, record["steps_per_sec"], record)
      ckpt.save(step, state, force=step == train.steps)
      for hook in hooks:
        hook(step, state)
  finally:
    ckpt.close()
  if is_writer():
    png = plot_metrics(workdir, train_keys=tuple(log.get("plot_train", PLOT_TRAIN)),
                       eval_keys=tuple(log.get("plot_eval", PLOT_EVAL)))
    print(f"wrote {png}", flush=True)
  return state


def _host_sums(window: list[dict]) -> dict:
  """Per-key sums of the steps' metrics, computed in numpy after one transfer.

  Not with `jax.tree.map(sum, ...)` on the device arrays: each `+` is then a small
  computation launched on every device while the next step is in flight, and on 4 virtual
  CPU devices (2 cores) the demo could wedge that way: one device sat in a halo-exchange
  collective-permute while the others' launches of the same step waited on XLA:CPU's
  per-device in-flight semaphore, and XLA aborted the rendezvous after 40 s. With the sums
  here, nothing but the steps is launched between steps (docs/design/host-metric-sums.md).
  """
  host = jax.device_get(window)
  return {key: np.sum([np.asarray(m[key], np.float64) for m in host], axis=0)
          for key in host[0]}
