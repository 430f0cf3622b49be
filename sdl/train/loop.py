"""The generic loop: resume, step, log, evaluate, checkpoint, plot.

Every piece that depends on the experiment comes in as a function or from config, so a
trainer for a new model family only builds its model, data and loss (see
`experiments/trainers/cosmoflow.py`). From config it reads `train.steps`, `log_every`,
`eval_every`, `checkpoint_every`, `keep_checkpoints`, `stall_seconds` (optional: in a
multi-process job, a process with no step finished for that long ends the job, default
`sdl.parallel.distributed.STALL_SECONDS`), and (optional) `log.shown` (the
metrics on the progress line) and `log.plot_train` / `log.plot_eval` (the series in the
plot).

What it guarantees:
- No NaN reaches a checkpoint: the step's sticky `finite` flag is read before every save,
  and a non-finite state stops the run with an error naming the last checkpoint, which
  is then the one a rerun resumes from. A resume refuses a non-finite checkpoint.
- A resume checks its checkpoint: the config saved with it is compared with the new one
  (`sdl.train.run_config`), before `config.json` is touched.
- The records after a resume equal the uninterrupted run's: the partial metric window is
  saved with each checkpoint.
- SIGTERM (a scheduler's preemption notice) saves a checkpoint and raises `Preempted`.
"""
import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from sdl.errors import ConfigError, NonFiniteError, Preempted
from sdl.parallel import distributed
from sdl.train import run_config
from sdl.train.checkpoint import Checkpointer
from sdl.train.evaluate import scalars
from sdl.train.metrics import MetricWriter, Progress, is_writer
from sdl.train.plots import plot_metrics
from sdl.train.step import TrainState

SHOWN = ("loss", "lr", "eval_loss")
PLOT_TRAIN, PLOT_EVAL = ("loss",), ("eval_loss",)
SKIPPED = "skipped_updates"  # a count in the records, not a mean


class _Window:
  """The metrics since the last record: device arrays of recent steps, plus host sums of
  earlier ones (after a save, or carried over from the checkpoint a run resumed)."""

  def __init__(self, carried: dict | None = None):
    carried = carried or {}
    self.sums = {k: np.asarray(v, np.float64) for k, v in carried.get("sums", {}).items()}
    self.count = int(carried.get("count", 0))
    self.pending = []

  def add(self, metrics) -> None:
    self.pending.append(metrics)

  def collect(self) -> None:
    """Move the pending steps' metrics into the host sums (one transfer)."""
    if self.pending:
      host = _host_sums(self.pending)
      self.sums = {k: self.sums.get(k, 0.0) + v for k, v in host.items()}
      self.count += len(self.pending)
      self.pending = []

  def __len__(self) -> int:
    return self.count + len(self.pending)

  def record(self) -> dict:
    """The means (`skipped_updates`: the count) over the window, which is then emptied."""
    self.collect()
    skipped = float(self.sums.get(SKIPPED, 0.0))
    kept = max(self.count - skipped, 1) if SKIPPED in self.sums else self.count
    out = scalars({k: v for k, v in self.sums.items() if k != SKIPPED}, kept)
    if SKIPPED in self.sums:
      out[SKIPPED] = int(round(skipped))
    self.sums, self.count = {}, 0
    return out

  def saved(self) -> dict:
    self.collect()
    return {"sums": {k: np.asarray(v).tolist() for k, v in self.sums.items()},
            "count": self.count}


class _Sigterm:
  """Notes a SIGTERM (main thread only; elsewhere the default handling stays). In a
  multi-process job JAX's preemption service catches it instead, and `at(step)` is true
  at the same step on every process, so that all save the same checkpoint."""

  def __init__(self):
    self.received = False
    self.previous = None

  def __enter__(self):
    if (threading.current_thread() is threading.main_thread()
        and not distributed.is_multiprocess()):
      self.previous = signal.signal(signal.SIGTERM, self._note)
    return self

  def at(self, step: int) -> bool:
    """Whether to save and stop after `step`; call once per step, in order."""
    if distributed.is_multiprocess():
      self.received = self.received or distributed.preempted(step)
    return self.received

  def _note(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def fit(*, workdir: str, config, init_state: Callable[[], TrainState], abstract_state: TrainState,
        train_step: Callable, get_batch: Callable[[int], dict],
        evaluate: Callable[[TrainState], dict] | None, schedule: Callable[[int], float],
        phase_of: Callable[[int], object] | None = None,
        hooks: Sequence[Callable[[int, TrainState], None]] = ()) -> TrainState:
  """Train for `config.train.steps` steps, resuming from the latest checkpoint in `workdir`.

  `train_step` is the jitted `(state, batch, phase) -> (state, metrics)`; `phase_of(i)`
  gives update `i`'s static phase (K-FAC's; None: the step takes no phase);
  `get_batch(step)` returns the global batch of `step` as sharded jax arrays;
  `evaluate(state)` returns eval metrics. `hooks(step, state)` run after every step
  (profilers, tests that simulate a crash).
  """
  train = config.train
  log = config.get("log") or {}
  run_config.check_workdir(workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), train.checkpoint_every,
                      train.keep_checkpoints)
  try:
    saved = ckpt.read_meta()  # the config first: its message says more than the state's
    changed = {} if saved is None else run_config.check_resume(
        saved["config"], config, f"the checkpoint in {ckpt.directory}")
    restored = ckpt.restore(abstract_state)
    if restored is None:
      state, carried = init_state(), None
    else:
      state, meta = restored
      carried = meta.get("window")
      note = f" with changes: {run_config.describe(changed)}" if changed else ""
      print(f"resumed from {workdir}/checkpoints at step {int(state.step)}{note}", flush=True)
    start = int(state.step)
    if is_writer():
      run_config.write(workdir, config, start_step=start, changed=changed)
    state = _train(config, log, ckpt, state, start, workdir, train_step, get_batch, evaluate,
                   schedule, phase_of, hooks, _Window(carried))
  finally:
    ckpt.close()
  if is_writer():
    png = plot_metrics(workdir, train_keys=tuple(log.get("plot_train", PLOT_TRAIN)),
                       eval_keys=tuple(log.get("plot_eval", PLOT_EVAL)))
    print(f"wrote {png}", flush=True)
  return state


def check_train_config(config) -> None:
  """The `train` fields the loop reads, checked before anything expensive."""
  t = config.train
  for field in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints"):
    value = t.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"train.{field}={value!r}: give a whole number of at least 1")
  stall = t.get("stall_seconds", 1)
  if isinstance(stall, bool) or not isinstance(stall, (int, float)) or stall <= 0:
    raise ConfigError(f"train.stall_seconds={stall!r}: give the seconds without a finished "
                      "step after which a multi-process job stops (default "
                      f"{distributed.STALL_SECONDS})")


check_workdir = run_config.check_workdir


def finished(workdir: str, config, abstract_state) -> TrainState | None:
  """The final state if `workdir` already holds a checkpoint at `train.steps` or later
  (checked as a resume would be), else None; a trainer asks before preparing its data."""
  directory = os.path.join(workdir, "checkpoints")
  # Every process must take the same branch: opening the checkpoints syncs all processes
  # inside orbax. Asked of each process's file system, a process that lagged could see
  # the directory that process 0 had since created for training, open it here, and sync
  # once more than the others: the job hung at its start.
  if distributed.from_process_zero(f"checkpoints-exist:{os.path.abspath(directory)}",
                                   str(os.path.isdir(directory))) != "True":
    return None
  ckpt = Checkpointer(directory, config.train.checkpoint_every, config.train.keep_checkpoints)
  try:
    step = ckpt.latest_step()
    if step is None or step < config.train.steps:
      return None
    run_config.check_resume(ckpt.read_meta()["config"], config,
                            f"the checkpoint in {ckpt.directory}")
    state, _ = ckpt.restore(abstract_state)
  finally:
    ckpt.close()
  print(f"{workdir} is already trained to step {step} (train.steps={config.train.steps}): "
        "nothing to do; raise train.steps to train on, or use another --workdir", flush=True)
  return state


def _train(config, log, ckpt, state, start, workdir, train_step, get_batch, evaluate, schedule,
           phase_of, hooks, window: _Window) -> TrainState:
  train = config.train
  writer = MetricWriter(workdir, resume_step=start)
  progress = Progress(train.steps, start, shown=tuple(log.get("shown", SHOWN)))
  waited = 0.0  # input wait already reported
  meta = lambda: {"config": run_config.as_dict(config), "window": window.saved()}

  def nonfinite(what: str) -> NonFiniteError:
    last = ckpt.latest_step()
    fixes = ("lower optim.lr, enable optim.clip_norm, set train.skip_nonfinite=True to skip "
             "such updates, or check the data")
    if last is not None and last == start:  # resumed, and no checkpoint since
      earlier = [s for s in ckpt.manager.all_steps() if s < last]
      before = (f"delete {ckpt.directory}/{last} to resume from checkpoint {max(earlier)}"
                if earlier else f"delete {ckpt.directory} to start from scratch")
      return NonFiniteError(
          f"{what}; this run resumed from checkpoint {last}, which leads there again: it is "
          f"finite but already diverging. {before}, and {fixes}")
    resume = (f"a rerun resumes from checkpoint {last}, the last verified finite"
              if last is not None else "nothing was saved, so a rerun starts from scratch")
    return NonFiniteError(f"{what}: {fixes}; {resume}")

  def verified(step):
    """Raise unless the state after `step` is finite (a host sync: read at saves only)."""
    if not bool(jax.device_get(state.finite)):
      raise nonfinite(f"the train state is not finite after step {step} (a NaN or infinity "
                      "in the loss, the gradients or the update)")

  compiled = set()
  watchdog = (distributed.StepWatchdog(train.get("stall_seconds", distributed.STALL_SECONDS))
              if distributed.is_multiprocess() else None)
  with _Sigterm() as sigterm, (contextlib.closing(watchdog) if watchdog else
                                contextlib.nullcontext()):
    for step in range(start + 1, train.steps + 1):
      t0 = time.perf_counter()
      batch = get_batch(step - 1)
      args = (state, batch) if phase_of is None else (state, batch, phase_of(step - 1))
      if args[2:] not in compiled:
        _compile_together(train_step, args, step)
        compiled.add(args[2:])
      state, metrics = train_step(*args)
      window.add(metrics)
      if len(window.pending) > 1:
        # At most two steps in flight: with many multi-device steps queued, XLA:CPU's
        # virtual devices (4 on 2 cores) could abort in a collective-permute rendezvous
        # (docs/design/host-metric-sums.md); a device is still fed one step ahead.
        jax.block_until_ready(window.pending[-2])
      if step == start + 1:
        jax.block_until_ready(metrics)
        print(f"first step (compile + run): {time.perf_counter() - t0:.1f} s", flush=True)
        progress.restart(step)  # rates and ETA without the compile
      eval_now = evaluate is not None and (step % train.eval_every == 0 or step == train.steps)
      if eval_now or step % train.log_every == 0 or step == train.steps:
        # Training metrics are means over the steps since the last record, not one noisy
        # step, summed on the host (`_host_sums`).
        first = step - len(window) + 1
        record = {"step": step, **window.record()}
        if not math.isfinite(record.get("loss", 0.0)):
          raise nonfinite(f"loss is {record['loss']} at step {step} (mean of steps "
                          f"{first}-{step})")
        record["lr"] = float(schedule(step - 1))
        if hasattr(get_batch, "wait_seconds"):  # a Prefetcher: exposed input time
          record["input_wait_s"] = get_batch.wait_seconds - waited
          waited = get_batch.wait_seconds
        record["steps_per_sec"] = progress.rate(step)
        if eval_now:
          record.update({f"eval_{k}": v for k, v in evaluate(state).items()})
        writer.write(record)
        progress.line(step, record["steps_per_sec"], record)
      stop = sigterm.at(step)
      if stop or ckpt.should_save(step) or step == train.steps:
        verified(step)
        ckpt.save(step, state, meta(), force=True)
      for hook in hooks:
        hook(step, state)
      if watchdog:
        watchdog.beat(step)
      if stop and step < train.steps:
        raise Preempted(f"SIGTERM at step {step}: saved checkpoint {step} in "
                        f"{ckpt.directory}; rerun the same command to resume")
  return state


def _compile_together(train_step, args, step: int) -> None:
  """In a multi-process job, compile the step for `args` ahead of its first run and wait
  for every process to have done so. A process that compiles more slowly would otherwise
  keep the others waiting inside the step's first collective, which gloo gives up on after
  30 s (`sdl.parallel.distributed`). On one process, nothing: the first call compiles."""
  if distributed.is_multiprocess():
    train_step.lower(*args).compile()  # jit's own caches keep it for the call that follows
    distributed.barrier(f"sdl-train-step-compiled-{step}")


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
