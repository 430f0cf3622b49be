"""One process of a CosmoFlow smoke job for tests/test_multiprocess.py (a script, not a
test): the entry point's path, plus a stall.

Usage (with SDL_COORDINATOR, SDL_NUM_PROCESSES, SDL_PROCESS_ID set, as `sdl.launch` does):
    multiprocess_worker.py WORKDIR STEPS STALL_PROCESS STALL_AT_STEP STALL_SECONDS
Process STALL_PROCESS stops stepping after step STALL_AT_STEP while staying alive (a
sleeping Python thread: heartbeats go on), as a hung data reader or file system would;
`train.stall_seconds` is STALL_SECONDS.
"""
import faulthandler
import signal
import sys
import time

from sdl.parallel import distributed

faulthandler.register(signal.SIGUSR1, all_threads=True)  # as the entry point does
workdir, steps, who, at, stall_seconds = sys.argv[1], *map(int, sys.argv[2:6])
distributed.initialize(distributed.detect(), cpu_devices=2)

import jax  # noqa: E402

from experiments.configs import cosmoflow as configs  # noqa: E402
from experiments.trainers import cosmoflow, entry  # noqa: E402

config = configs.get_config("smoke")
config.mesh.shape = (2, 2)
config.train.update(steps=steps, log_every=1, eval_every=10_000, checkpoint_every=10_000,
                    stall_seconds=stall_seconds)


def stall(step, state):
  del state
  if step == at and jax.process_index() == who:
    print(f"stalling after step {step}", flush=True)
    time.sleep(3600)


entry.guarded(lambda: cosmoflow.run(config, workdir, hooks=[stall]))
