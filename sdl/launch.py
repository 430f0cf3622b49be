"""Start a multi-process JAX job on this machine, to try multi-host behaviour on a laptop
and to test it:

    python -m sdl.launch -n 2 [--cpu_devices 2] [--logdir DIR] -- \\
        python -m experiments.cosmoflow --config=experiments/configs/cosmoflow.py:smoke

Each of the N processes gets `SDL_COORDINATOR` (localhost and a free port),
`SDL_NUM_PROCESSES` and `SDL_PROCESS_ID`, which every sdl entry point reads
(`sdl.parallel.distributed`), and, with `--cpu_devices K`, K virtual CPU devices. Their
output is streamed with a `[i]` prefix and written whole to `DIR/process_<i>.log`.

When one process fails, the others get SIGTERM (and SIGKILL 30 s later), so a job never
hangs on a dead peer; Ctrl-C or SIGTERM to the launcher is passed on the same way. The exit
status is the first failing process's, else 0. On a cluster, use its own launcher (srun,
mpirun) instead: `docs/scaling.md`.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 30  # from SIGTERM to SIGKILL: time to save a checkpoint


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def parse(argv):
  parser = argparse.ArgumentParser(prog="python -m sdl.launch", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-n", "--num_processes", type=int, required=True)
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="virtual CPU devices per process")
  parser.add_argument("--logdir", default=None, help="where process_<i>.log go "
                      "(default: a new directory under /tmp)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="-- then the command every process runs")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- python -m experiments.cosmoflow ...")
  if args.num_processes < 1:
    parser.error(f"-n {args.num_processes}: give at least 1 process")
  return args, command


def environment(process_id: int, num_processes: int, port: int, cpu_devices: int | None,
                base=os.environ) -> dict:
  env = {**base, "SDL_COORDINATOR": f"localhost:{port}",
         "SDL_NUM_PROCESSES": str(num_processes), "SDL_PROCESS_ID": str(process_id),
         "PYTHONUNBUFFERED": "1"}
  if cpu_devices:
    env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
    # The device count is the config's, not an inherited forced one.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def exit_status(returncode: int) -> int:
  """A shell's exit status for a child's return code (128 + N for death by signal N)."""
  return 128 - returncode if returncode < 0 else returncode


def _pump(process_id: int, stream, log, out, lock) -> None:
  for line in iter(stream.readline, ""):
    log.write(line)
    log.flush()
    with lock:
      out.write(f"[{process_id}] {line}")
      out.flush()


def run(num_processes: int, command: list[str], *, cpu_devices: int | None = None,
        logdir: str | None = None, port: int | None = None, out=sys.stdout) -> int:
  """Run `command` as `num_processes` processes of one job; the exit status (module
  docstring)."""
  import tempfile  # noqa: PLC0415
  logdir = logdir or tempfile.mkdtemp(prefix="sdl-launch-")
  os.makedirs(logdir, exist_ok=True)
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps, logs = [], [], []
  for i in range(num_processes):
    log = open(os.path.join(logdir, f"process_{i}.log"), "w")
    proc = subprocess.Popen(command, env=environment(i, num_processes, port, cpu_devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # our signals reach it only through us
    pump = threading.Thread(target=_pump, args=(i, proc.stdout, log, out, lock), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
    logs.append(log)
  print(f"launched {num_processes} processes (coordinator localhost:{port}); logs in {logdir}",
        file=out, flush=True)

  stopping = []

  def stop(reason: str):
    if stopping:
      return
    stopping.append(time.monotonic())
    print(f"[launch] {reason}: sending SIGTERM to the others", file=out, flush=True)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, lambda sig, _: stop(signal.Signals(sig).name))
              for s in (signal.SIGINT, signal.SIGTERM)}
  status = None
  try:
    while [p.poll() for p in procs].count(None):  # every one polled, none skipped
      for i, p in enumerate(procs):
        if p.returncode not in (None, 0) and status is None:
          status = exit_status(p.returncode)
          stop(f"process {i} exited with status {status}")
      if stopping and time.monotonic() - stopping[0] > GRACE_SECONDS:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for pump in pumps:
      pump.join(timeout=5)
    for log in logs:
      log.close()
  if status is None:
    status = next((exit_status(p.returncode) for p in procs if p.returncode), 0)
  if status:
    print(f"[launch] failed with status {status}; logs in {logdir}", file=out, flush=True)
  return status


def main(argv=None) -> int:
  args, command = parse(sys.argv[1:] if argv is None else argv)
  return run(args.num_processes, command, cpu_devices=args.cpu_devices, logdir=args.logdir,
             port=args.port)


if __name__ == "__main__":
  sys.exit(main())
