"""A run's config on disk, and what a resume may change.

`config.json` in the workdir is the config of the latest start (with the process settings
applied, under `process.applied`); `config_history.jsonl` keeps one line per start: when,
from which step, the config, and what changed since the checkpoint it resumed.

On resume the config saved with the checkpoint is compared with the new one, field by
field. A change that leaves the train state's meaning and shapes alone (`COMPATIBLE`:
learning-rate schedule, steps and every-N fields, batch size, mesh, data location) is
printed and recorded; any other (the model, the data's sizes, the optimiser, the seed) is
an error naming the fields. Runtime settings (`RUNTIME`) are left out.
"""
import datetime
import json
import os
import socket

from sdl import process
from sdl.errors import CheckpointError, ConfigError

COMPATIBLE = ("train.", "eval.", "log.", "mesh.", "optim.lr", "optim.warmup_steps",
              "optim.decay", "optim.clip_norm", "optim.weight_decay", "data.path",
              "data.source", "data.prefetch")
RUNTIME = ("process.", "mesh.cpu_devices")
HISTORY = "config_history.jsonl"


def as_dict(config) -> dict:
  """A config (ConfigDict or dict) as plain JSON data (tuples become lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _matches(field: str, prefixes) -> bool:
  return any(field.startswith(p) if p.endswith(".") else field == p for p in prefixes)


def changes(old: dict, new: dict) -> dict[str, tuple]:
  """`{field: (old value, new value)}` for every field that differs (runtime left out);
  a field only one side has reads as `<absent>` on the other."""
  a, b = flatten(old), flatten(new)
  absent = "<absent>"
  return {f: (a.get(f, absent), b.get(f, absent)) for f in sorted(set(a) | set(b))
          if a.get(f, absent) != b.get(f, absent) and not _matches(f, RUNTIME)}


def check_resume(saved: dict, config, checkpoint: str) -> dict[str, tuple]:
  """The compatible changes from the checkpoint's config `saved` to `config`; raises
  CheckpointError naming the incompatible ones."""
  diff = changes(saved, as_dict(config))
  wrong = {f: v for f, v in diff.items() if not _matches(f, COMPATIBLE)}
  if wrong:
    listed = "; ".join(f"{f}: {old!r} in the checkpoint, {new!r} now"
                       for f, (old, new) in wrong.items())
    raise CheckpointError(
        f"{checkpoint} was written with another config, and these fields change what the "
        f"train state means: {listed}. Set them back to resume, or use another --workdir")
  return diff


def describe(diff: dict[str, tuple]) -> str:
  return ", ".join(f"{f} {old!r} -> {new!r}" for f, (old, new) in diff.items())


def write(workdir: str, config, *, start_step: int, changed: dict[str, tuple]) -> None:
  """`config.json` (atomically) and one more line of `config_history.jsonl`."""
  resolved = as_dict(config)
  resolved.setdefault("process", {})["applied"] = process.applied()
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, "config.json"))
  entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "start_step": start_step, "changed": {f: list(v) for f, v in changed.items()},
           "config": resolved}
  with open(os.path.join(workdir, HISTORY), "a") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")


def check_workdir(workdir: str) -> None:
  """Raise ConfigError unless `workdir` is (or can be made) a writable directory."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; choose another path")
  try:
    os.makedirs(path, exist_ok=True)
    # One probe per process: the processes of a job check the same (shared) directory at
    # once, and one's removal must not pull another's file away.
    probe = os.path.join(path, f".sdl-write-test-{socket.gethostname()}-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as error:
    raise ConfigError(f"--workdir={workdir} cannot be written ({error.strerror}); choose a "
                      "directory you can write to") from None
