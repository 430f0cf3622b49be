"""The errors a user can fix: one small hierarchy, each message naming the file or field
and the fix. Entry points print such an error's message alone and exit with status 2
(`experiments.trainers.entry`); anything else is a bug and keeps its traceback."""


class UserError(Exception):
  """A problem in the user's config, data or files (not in sdl)."""


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message names the field and the fix."""


class DataError(UserError):
  """Data that cannot be read or is corrupt; the message names the file."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint this run cannot use; the message says why and what to do."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a NaN or an infinity; the message names the step, the last
  checkpoint verified finite, and the fields to change."""


class Preempted(UserError):
  """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""
