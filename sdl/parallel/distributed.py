"""Multi-process jobs on JAX's own runtime (`jax.distributed`): which job this process is
part of, joining it, and the CPU collectives' quirks. The one place that knows about them.

A process joins a job when one of these says so, first match wins:

  flags      `--coordinator HOST:PORT --num_processes N --process_id I` on an entry point,
             or the same as `SDL_COORDINATOR`, `SDL_NUM_PROCESSES`, `SDL_PROCESS_ID` in the
             environment (what `python -m sdl.launch` sets);
  slurm      a step started by `srun` with more than one task (`SLURM_STEP_NUM_TASKS`);
             JAX reads the node list, task count and rank itself;
  openmpi    `mpirun -n N` with N > 1 (`OMPI_COMM_WORLD_SIZE`). Open MPI 4 is read by JAX
             itself (`OMPI_MCA_orte_hnp_uri`); Open MPI 5 no longer sets that, and JAX
             reaches it through mpi4py (`cluster_detection_method="mpi4py"`);
  tpu        a TPU pod slice with more than one host (`TPU_WORKER_HOSTNAMES`); JAX reads
             the rest from the TPU runtime.

Anything else is one process, and nothing happens. On CPU the processes' collectives run
over gloo (TCP), or over the cluster's MPI with `SDL_CPU_COLLECTIVES=mpi`
(`cpu_collectives`; docs/scaling.md).

Gloo's quirk that matters here: a collective waits at most 30 s for the other processes
(jax#40831, not configurable from JAX), so processes that drift further apart, such as one
compiling or writing a plot longer than the others, fail with "Read timeout". `barrier`
waits on the coordination service instead, whose timeout is ours to set; the train loop
calls it where processes can drift (`sdl.train.loop`).
"""
import dataclasses
import os
import threading
import time

import jax

from sdl.errors import ConfigError

ENV = {"coordinator": "SDL_COORDINATOR", "num_processes": "SDL_NUM_PROCESSES",
       "process_id": "SDL_PROCESS_ID"}
SOURCES = ("flags", "slurm", "openmpi", "tpu")
# A process that stops answering is declared dead after this long; JAX's default is 100 s.
HEARTBEAT_SECONDS = 10
BARRIER_SECONDS = 1800  # long compiles and checkpoint writes on slow file systems


@dataclasses.dataclass(frozen=True)
class Job:
  """A multi-process job: where its description came from (`SOURCES`) and what is known of
  it before joining. Unknown fields (None) are resolved by JAX's cluster detection."""
  source: str
  num_processes: int | None = None
  process_id: int | None = None
  coordinator: str | None = None
  detection: str | None = None  # JAX's cluster_detection_method, where JAX needs one

  def describe(self) -> str:
    who = "" if self.process_id is None else f"process {self.process_id} "
    of = "" if self.num_processes is None else f"of {self.num_processes} "
    return f"{who}{of}({self.source})".strip()


def _int(value, name: str, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{where} {name}={value!r}: give a whole number") from None


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, environ=os.environ) -> Job | None:
  """The job this process belongs to (module docstring), or None for a single process.
  Explicit values (flags) win over `SDL_*` variables, which win over the cluster's."""
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  where = "flag"
  if all(v is None for v in given.values()):
    given = {k: environ.get(v) for k, v in ENV.items()}
    where = "environment variable"
  if any(v is not None for v in given.values()):
    name = (lambda k: f"--{k}") if where == "flag" else (lambda k: ENV[k])
    missing = [name(k) for k, v in given.items() if v is None]
    if given["num_processes"] is not None and _int(given["num_processes"], name(
        "num_processes"), where) == 1:
      return None
    if missing:
      present = ", ".join(f"{name(k)}={v}" for k, v in given.items() if v is not None)
      raise ConfigError(f"{present} starts a multi-process job, which also needs "
                        f"{' and '.join(missing)} (every process: the same coordinator "
                        "HOST:PORT and process count, its own process id from 0)")
    n = _int(given["num_processes"], name("num_processes"), where)
    i = _int(given["process_id"], name("process_id"), where)
    if not 0 <= i < n:
      raise ConfigError(f"{name('process_id')}={i}: give 0 to {n - 1} for a job of "
                        f"{name('num_processes')}={n} processes")
    if ":" not in str(given["coordinator"]):
      raise ConfigError(f"{name('coordinator')}={given['coordinator']!r}: give HOST:PORT of "
                        "process 0, for example localhost:12355")
    return Job("flags", n, i, str(given["coordinator"]))
  tasks = environ.get("SLURM_STEP_NUM_TASKS")
  if "SLURM_JOB_ID" in environ and tasks and int(tasks) > 1:
    return Job("slurm", int(tasks), int(environ.get("SLURM_PROCID", 0)))
  size = environ.get("OMPI_COMM_WORLD_SIZE")
  if size and int(size) > 1:
    rank = int(environ.get("OMPI_COMM_WORLD_RANK", 0))
    if "OMPI_MCA_orte_hnp_uri" in environ:  # Open MPI 4 and older
      return Job("openmpi", int(size), rank)
    return Job("openmpi", int(size), rank, detection="mpi4py")  # Open MPI 5 (PRRTE)
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return Job("tpu", len(hosts), int(environ.get("TPU_WORKER_ID", 0)))
  return None


def initialize(job: Job | None, cpu_devices: int | None = None) -> None:
  """Join `job` (nothing for None), with `cpu_devices` virtual CPU devices per process.
  Call before anything starts JAX's backend."""
  if cpu_devices and cpu_devices > 1:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if job is None:
    return
  if job.detection == "mpi4py":
    import importlib.util  # noqa: PLC0415
    if importlib.util.find_spec("mpi4py") is None:
      raise ConfigError(
          f"an Open MPI 5 job ({job.num_processes} processes) is joined through mpi4py, which "
          "is not installed: `pip install mpi4py` (built against this Open MPI), or pass "
          "--coordinator, --num_processes and --process_id")
  # Only the CPU backend reads it; GPUs and TPUs keep their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives())
  explicit = job.source == "flags"
  jax.distributed.initialize(
      coordinator_address=job.coordinator if explicit else None,
      num_processes=job.num_processes if explicit else None,
      process_id=job.process_id if explicit else None,
      cluster_detection_method=job.detection,
      heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
  via = f", through {job.detection}" if job.detection else ""
  print(f"joined the job as {job.describe()}{via}; collectives on CPU: {cpu_collectives()}",
        flush=True)


CPU_COLLECTIVES = ("gloo", "mpi")


def cpu_collectives(environ=None) -> str:
  """What carries the CPU processes' collectives: `SDL_CPU_COLLECTIVES`, default gloo (TCP,
  works anywhere); "mpi" uses the cluster's MPI through MPItrampoline (`MPITRAMPOLINE_LIB`
  must name its wrapper library; docs/scaling.md)."""
  environ = os.environ if environ is None else environ
  chosen = environ.get("SDL_CPU_COLLECTIVES", "gloo")
  if chosen not in CPU_COLLECTIVES:
    raise ConfigError(f"SDL_CPU_COLLECTIVES={chosen!r}: choose one of {CPU_COLLECTIVES}")
  if chosen == "mpi" and not environ.get("MPITRAMPOLINE_LIB"):
    raise ConfigError("SDL_CPU_COLLECTIVES=mpi runs JAX's CPU collectives through "
                      "MPItrampoline: set MPITRAMPOLINE_LIB to the MPIwrapper library built "
                      "against this cluster's MPI (docs/scaling.md), or unset "
                      "SDL_CPU_COLLECTIVES for gloo")
  return chosen


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def barrier(name: str, timeout_seconds: int = BARRIER_SECONDS) -> None:
  """Wait until every process reaches `barrier(name)`, for at most `timeout_seconds`; on one
  process, return at once. Waits on the coordination service, not in a collective, so it
  is not bound by gloo's 30 s (module docstring). Each name is used once per job."""
  if is_multiprocess():
    _client().wait_at_barrier(name, timeout_in_ms=timeout_seconds * 1000)


def from_process_zero(name: str, value: str, timeout_seconds: int = BARRIER_SECONDS) -> str:
  """Process 0's `value` on every process (each passes its own; only process 0's counts),
  through the coordination service; on one process, `value`. For decisions that must be
  the same everywhere but read something that can change under a process's feet, such as
  whether a directory that process 0 is about to create exists yet. Each name once."""
  if not is_multiprocess():
    return value
  key = f"sdl/agree/{name}"
  if jax.process_index() == 0:
    _client().key_value_set(key, value, allow_overwrite=True)
  return _client().blocking_key_value_get(key, timeout_seconds * 1000)


# ---- failures: a lost process, a stalled one, preemption -----------------------------------
#
# A process that dies, or freezes whole (SIGKILL, SIGSTOP, a lost node), stops sending
# heartbeats; after HEARTBEAT_SECONDS JAX's coordinator ends every other process with
# "The following tasks are unhealthy (stopped sending heartbeats): <ids>". Survivors blocked
# in a collective usually learn it sooner from the collective itself (gloo: "Connection
# reset by peer"), and `lost_peer_message` turns that into one line. A process that stays
# alive but stops stepping keeps its heartbeats going: `StepWatchdog` ends it, and the
# others then fail in their next collective (gloo gives up after 30 s; on GPU each one's
# own watchdog ends it). SIGTERM is the scheduler's preemption notice: JAX's preemption
# service agrees on one step at which every process saves and stops (`preempted`).

EXIT_LOST_PEER = 75  # EX_TEMPFAIL: rerun the job, it resumes from the last checkpoint
STALL_SECONDS = 600  # default `train.stall_seconds`: far above any step, save or evaluation


def _client():
  from jax._src import distributed  # noqa: PLC0415 (the runtime's client has no public path)
  return distributed.global_state.client


def lost_processes(timeout_seconds: float = HEARTBEAT_SECONDS + 5) -> list[int]:
  """The processes the coordinator no longer counts as alive. Blocks until the live ones
  have all asked, or a dead one is noticed (at most a heartbeat timeout)."""
  everyone = list(range(jax.process_count()))
  result = []

  def ask():
    result.append(_client().get_live_nodes(everyone))
  asker = threading.Thread(target=ask, daemon=True)
  asker.start()
  asker.join(timeout_seconds)
  return sorted(set(everyone) - set(result[0])) if result else []


def is_lost_peer(error: BaseException) -> bool:
  """Whether `error` is a collective that failed because a peer went away or stalled."""
  text = str(error)
  return is_multiprocess() and isinstance(error, jax.errors.JaxRuntimeError) and any(
      s in text for s in ("Gloo", "gloo", "NCCL", "Connection reset", "Connection closed",
                          "Read timeout", "DEADLINE_EXCEEDED", "UNAVAILABLE"))


def lost_peer_message(error: BaseException) -> str:
  """One line for a collective that failed on a lost or stalled peer, naming the lost
  process once the coordinator knows it. Prints a first line at once: JAX's coordinator
  may end this process (its own message names the lost one) while it waits."""
  first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
  me = f"process {jax.process_index()} of {jax.process_count()}"
  print(f"error: {me} lost another process of this job in a collective ({first}); asking "
        "the coordinator which", flush=True)
  lost = lost_processes()
  who = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} "
         f"{'are' if len(lost) > 1 else 'is'} not alive" if lost else
         "none is reported dead, so one stalled (its own watchdog names it) or the network "
         "failed")
  return f"{me}: {who}; rerun the job to resume from its last checkpoint"


def preempted(step: int) -> bool:
  """Whether the job stops at `step` for a SIGTERM received by any of its processes: the
  same answer on every process (JAX's preemption sync point). Call it at every step."""
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return multihost_utils.reached_preemption_sync_point(step)


class StepWatchdog:
  """Ends this process, with a line naming the process that fell behind, when no step
  finished for `seconds`. `beat(step)` after each step (and after each evaluation or
  save); it arms itself at the first beat, so the first compile is not timed."""

  def __init__(self, seconds: float, check_every: float = 1.0):
    self.seconds, self.check_every = seconds, check_every
    self.last, self.step = None, None
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="sdl-step-watchdog")
    self._thread.start()

  def beat(self, step: int) -> None:
    self.last, self.step = time.monotonic(), step
    if is_multiprocess():  # for the others' watchdogs to name who fell behind
      _client().key_value_set(f"sdl/step/{jax.process_index()}", str(step), allow_overwrite=True)

  def close(self) -> None:
    self._done.set()

  def _watch(self) -> None:
    while not self._done.wait(self.check_every):
      if self.last is None:
        continue
      idle = time.monotonic() - self.last
      # A process waiting in a collective for a stalled one is idle as long: it leaves
      # the stalled one's watchdog to fire first (then learns of the lost peer), waiting
      # up to twice as long before it gives up itself.
      if idle > self.seconds and (idle > 2 * self.seconds or not self._waiting_for_another()):
        self._fire(idle)

  def steps(self) -> dict[int, str]:
    """Where each process last reported ('?' where unknown)."""
    steps = {}
    for i in range(jax.process_count()):
      try:
        steps[i] = _client().key_value_try_get(f"sdl/step/{i}")
      except Exception:  # noqa: BLE001 (not reported yet, or the coordinator is gone)
        steps[i] = "?"
    return steps

  def _waiting_for_another(self) -> bool:
    """Whether another process is behind this one: at an earlier step, or at the same one
    with a higher index (ties go that way, so that process 0, the coordinator whose exit
    takes the job's coordination down, is the last to give up)."""
    if not is_multiprocess() or self.step is None:
      return False
    me = jax.process_index()
    for i, step in self.steps().items():
      if i != me and step.isdigit() and (int(step), -i) < (self.step, -me):
        return True
    return False

  def behind(self) -> str:
    """Where each process last reported: '0: step 7, 1: step 4'."""
    if not is_multiprocess():
      return ""
    return ", ".join(f"{i}: step {s}" for i, s in self.steps().items())

  def _fire(self, idle: float) -> None:
    where = self.behind()
    me = f"process {jax.process_index()}" if is_multiprocess() else "this process"
    print(f"error: no training step finished on {me} for {idle:.0f} s, after step "
          f"{self.step} (train.stall_seconds={self.seconds:g})"
          + (f"; last steps finished by each process: {where}" if where else "")
          + ". A process stalled; the job stops. Rerun it to resume from the last checkpoint",
          flush=True)
    os._exit(EXIT_LOST_PEER)  # the main thread may be stuck inside a collective
