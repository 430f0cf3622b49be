"""Atomic, periodic checkpoints with automatic resume (orbax `CheckpointManager`).

Orbax writes each checkpoint into a temporary directory and renames it into place only
once complete, so a run killed at any moment leaves either the previous checkpoint or the
new one, never a half-written one that looks complete. Restores go straight into the
target shardings (`abstract_state` carries them), never through one device.

Each checkpoint holds two items: `state` (the train state) and `meta`, a JSON object with
the checkpoint format (`FORMAT`), the config that wrote it, and the loop's partial metric
window (so that the first record after a resume equals the uninterrupted run's). A
checkpoint without `meta` (written by an older sdl), of another format, or of a state with
other shapes is refused with a message that says so and what to do, never with orbax's
tree-mismatch traceback. The loop saves only states verified finite.
"""
import errno
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdl.errors import CheckpointError

FORMAT = 3  # TrainState(step, params, opt_state, rng, model_state, finite) + meta


class Checkpointer:
  def __init__(self, directory: str, every: int, keep: int):
    self.every = every
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def _fix(self) -> str:
    return (f"start a new run with another --workdir, or delete {self.directory} to train "
            "from scratch")

  def read_meta(self, step: int | None = None) -> dict | None:
    """The `meta` item of checkpoint `step` (default: the latest), or None if none."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    if not os.path.isdir(os.path.join(self.directory, str(step), "meta")):
      raise CheckpointError(
          f"{self.directory} holds checkpoints (latest step {step}) written by an older sdl, "
          f"without the config and format they were written with; this sdl cannot resume "
          f"them: {self._fix()}")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("format") != FORMAT:
      raise CheckpointError(f"{self.directory}: checkpoint format {meta.get('format')}, this "
                            f"sdl reads format {FORMAT}: {self._fix()}")
    return meta

  def restore(self, abstract_state):
    """(state, meta) of the latest checkpoint, restored into `abstract_state`'s shapes and
    shardings, or None when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.read_meta(step)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as error:
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} does not match this run's "
          f"train state (another model, optimiser or config wrote it): {self._fix()}. Orbax "
          f"said: {str(error).splitlines()[0][:300]}") from error
    state = restored.state
    if not all_finite(state):
      raise CheckpointError(f"the checkpoint at step {step} in {self.directory} holds NaN or "
                            f"infinite values; delete {self.directory}/{step} to resume from "
                            "the one before it, or start a new run")
    return state, meta

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Save `state` with `meta` (format added) if `step` is due (or `force`)."""
    meta = {**meta, "format": FORMAT}
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
      if saved:
        self.manager.wait_until_finished()  # so a full disk is reported here, at its step
    except OSError as error:
      if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CheckpointError(
            f"no space left on the device writing checkpoint {step} under {self.directory}; "
            f"the previous checkpoint ({self.latest_step()}) is kept. Free space or "
            "lower train.keep_checkpoints, then rerun to resume") from error
      raise
    return saved

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def all_finite(tree) -> bool:
  """Whether every floating-point leaf of `tree` holds only finite values (and its
  `finite` flag, if it is a train state, says so)."""
  flag = getattr(tree, "finite", None)
  if flag is not None and not bool(np.asarray(jax.device_get(flag))):
    return False
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, np.inexact) and not bool(
        jax.device_get(jax.numpy.all(jax.numpy.isfinite(leaf)))):
      return False
  return True


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shape structs) with `shardings` attached."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
