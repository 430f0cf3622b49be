"""The thin command line of a trainer: `--config` (file and `:variant`) and `--workdir`,
then `trainer.run(config, workdir)` once the CPU devices the config asks for exist.

A user's mistake (a bad flag or override, a config that cannot run, bad data, a checkpoint
that does not fit: `sdl.errors.UserError`) prints one line, `error: ...`, and exits with
status 2; `--traceback` (or `SDL_TRACEBACK=1`) shows the whole traceback instead. A run
stopped by SIGTERM saves a checkpoint and exits with status 143 (128 + SIGTERM).

Part of a multi-process job (`--coordinator`, `--num_processes`, `--process_id`, or
SLURM, Open MPI or a TPU pod: `sdl.parallel.distributed`), it joins the job first; a
process that loses a peer in a collective prints one line naming it and exits with status
75, and a rerun of the job resumes.
"""
import faulthandler
import importlib
import os
import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sdl.errors import Preempted, UserError
from sdl.parallel import distributed, ensure_cpu_devices

EXIT_USER_ERROR, EXIT_PREEMPTED = 2, 143


def wants_traceback(argv=sys.argv) -> bool:
  return "--traceback" in argv or os.environ.get("SDL_TRACEBACK", "") not in ("", "0")


def fail(message: str, status: int = EXIT_USER_ERROR):
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv):
  """absl's parsing, but a bad flag, override or config file is one line and status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001 (absl's errors and the config overrides' alike)
    if wants_traceback(argv):
      raise
    fail(override_error_message(error, argv))


def flag_error_message(error: Exception) -> str:
  """One line for a flag-parsing error: the flag and the innermost message (a config file
  that raised has its traceback inside absl's message)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  flag = re.match(r"flag (--\S+): ", lines[0]) if lines else None
  if any(line.startswith("Traceback") or "Traceback (most recent" in line for line in lines):
    text = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
  else:
    text = " ".join(lines)
  text = text.replace("\\n", " ").replace('\\"', '"')
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr'd KeyError
    text = text[1:-1]
  return f"{flag[1]}: {text}" if flag and not text.startswith(flag[0]) else text


def override_error_message(error: Exception, argv) -> str:
  """One line for a `--config.a.b=...` override that names no field: the override and
  ml_collections' suggestion."""
  text = str(error).replace("\\n", " ").replace("\\'", "'").replace('\\"', '"').strip("'\"")
  key = re.match(r"'?(\w+)'?", text)
  suggestion = re.search(r"Did you mean .*", text)
  for arg in argv:
    name = arg.split("=", 1)[0]
    if key and name.startswith("--config.") and name.endswith(f".{key[1]}"):
      section = name[len("--config."):-len(key[1]) - 1]
      return (f"{arg}: the config has no field {key[1]!r}"
              + (f" in {section!r}" if section else "")
              + (f"; {suggestion[0]}" if suggestion else
                 f"; {config_file(argv)} lists its fields"))
  return flag_error_message(error)


def config_file(argv) -> str:
  """The config file that `--config=FILE[:variant]` names, or words for it."""
  given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
  return given[-1].split(":")[0] if given else "the config file"


def main(trainer: str, default_config: str, default_workdir: str) -> None:
  """Define the flags and run `experiments.trainers.<trainer>.run` (call it under
  `if __name__ == "__main__"`)."""
  try:  # ml_collections reads the overrides in sys.argv already here
    config_flag = config_flags.DEFINE_config_file(
        "config", default_config, "Config file (and :variant).", lock_config=True)
  except Exception as error:  # noqa: BLE001 (a misspelled or ill-typed override)
    if wants_traceback():
      raise
    fail(override_error_message(error, sys.argv))
  workdir_flag = flags.DEFINE_string("workdir", default_workdir, "Checkpoints, metrics, plots.")
  flags.DEFINE_bool("traceback", False, "Show the full traceback of a user error.")
  coordinator = flags.DEFINE_string(
      "coordinator", None, "Multi-process job: HOST:PORT of process 0 (also SDL_COORDINATOR; "
      "SLURM, Open MPI and TPU pods are detected without it).")
  num_processes = flags.DEFINE_integer("num_processes", None, "Multi-process job: how many.")
  process_id = flags.DEFINE_integer("process_id", None, "Multi-process job: this one, from 0.")

  def run(argv):
    del argv
    config = config_flag.value
    # orbax's and absl's warnings on every save and resume say nothing a user can act on
    logging.set_verbosity(logging.ERROR)

    def start():
      # `kill -USR1 <pid>` prints where every thread of a process is: for a job that
      # hangs, which process waits where.
      if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
      # A multi-process job joined and the CPU devices set: both before JAX starts its
      # backend, and before the jax-heavy trainer module is imported.
      job = distributed.detect(coordinator.value, num_processes.value, process_id.value)
      distributed.initialize(job, config.mesh.get("cpu_devices"))
      ensure_cpu_devices(config.mesh.get("cpu_devices"))
      importlib.import_module(f"experiments.trainers.{trainer}").run(config, workdir_flag.value)
    guarded(start)
  app.run(run, flags_parser=parse_flags)


def guarded(run):
  """`run()`, with the exits a user acts on: a preempted run saved and exits 143, a user's
  mistake prints one line and exits 2, and a collective that lost a peer process prints one
  line naming it and exits 75 (rerun to resume); anything else is a bug and raises."""
  try:
    return run()
  except Preempted as stop:
    print(stop, file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except UserError as error:
    if wants_traceback():
      raise
    fail(str(error))
  except Exception as error:  # noqa: BLE001 (a collective that lost its peer, else a bug)
    if not distributed.is_lost_peer(error) or wants_traceback():
      raise
    fail(distributed.lost_peer_message(error), distributed.EXIT_LOST_PEER)


def model_directory(checkpoint: str, export_to: str | None, export) -> str | None:
  """The exported model a command reads, from its `--checkpoint` and `--export` flags:
  `checkpoint` itself, or, for a training workdir, its latest checkpoint exported by
  `export(workdir, out)` (to `export_to`, else `<workdir>/model`). None when the command
  was asked only to export (`export_to` given): it is done."""
  if os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a training workdir
    out = export(checkpoint, export_to or os.path.join(checkpoint, "model"))
    if export_to:
      print(f"wrote {out}")
      return None
    return out
  if export_to:
    raise UserError(f"--export needs a training workdir as --checkpoint, got {checkpoint}")
  return checkpoint
