"""Atomic, periodic checkpoints with automatic resume (orbax `CheckpointManager`).

Orbax writes each checkpoint into a temporary directory and renames it into place only
once complete, so a run killed at any moment leaves either the previous checkpoint or the
new one, never a half-written one that looks complete. Restores go straight into the
target shardings (`abstract_state` carries them), never through one device.

Each checkpoint directory carries `sdl_checkpoint.json`, naming the state's layout
(`FORMAT`). A directory written before it existed (the state had no `model_state`), or by
a config whose state has other shapes, is refused with a message that says so and what to
do, not with orbax's tree-mismatch traceback.
"""
import json
import os

import jax
import orbax.checkpoint as ocp

FORMAT = {"format": 2, "state": "TrainState(step, params, opt_state, rng, model_state)"}
MARKER = "sdl_checkpoint.json"


class CheckpointError(RuntimeError):
  """A checkpoint this run cannot restore; the message says why and what to do."""


class Checkpointer:
  def __init__(self, directory: str, every: int, keep: int):
    self.every = every
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state):
    """Latest checkpoint restored into `abstract_state`'s shapes and shardings, or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    fix = (f"start a new run with another --workdir, or delete {self.directory} to train "
           "from scratch")
    marker = os.path.join(self.directory, MARKER)
    if not os.path.exists(marker):
      raise CheckpointError(
          f"{self.directory} holds checkpoints (latest step {step}) written by an older sdl, "
          f"whose train state had no model_state; this sdl cannot restore them: {fix}")
    with open(marker) as f:
      found = json.load(f)
    if found.get("format") != FORMAT["format"]:
      raise CheckpointError(f"{self.directory}: checkpoint format {found.get('format')}, this "
                            f"sdl reads format {FORMAT['format']}: {fix}")
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as error:
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} does not match this run's "
          f"train state (another model, optimiser or config wrote it): {fix}. Orbax said: "
          f"{str(error).splitlines()[0][:300]}") from error

  def save(self, step: int, state, *, force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    marker = os.path.join(self.directory, MARKER)
    if saved and jax.process_index() == 0 and not os.path.exists(marker):
      with open(marker + ".tmp", "w") as f:
        json.dump(FORMAT, f)
      os.replace(marker + ".tmp", marker)
    return saved

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shape structs) with `shardings` attached."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
