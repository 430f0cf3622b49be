"""Atomic, periodic checkpoints with automatic resume (orbax `CheckpointManager`).

Orbax writes each checkpoint into a temporary directory and renames it into place only
once complete, so a run killed at any moment leaves either the previous checkpoint or the
new one, never a half-written one that looks complete. Restores go straight into the
target shardings (`abstract_state` carries them), never through one device.
"""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, every: int, keep: int):
    self.every = every
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
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or shape structs) with `shardings` attached."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
