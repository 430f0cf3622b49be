"""`import sdl` changes nothing in the process; `sdl.process.configure()` is the one call
that does, and the entry points make it first thing."""
import json
import os
import subprocess
import sys

import pytest

from sdl import host_memory, process

# In a fresh interpreter that loads numpy first: the environment, the BLAS thread counts
# and the allocator's behaviour before and after importing every sdl package, then after
# `configure()`. The allocator is checked by behaviour: RSS after freeing a touched
# 256 MiB block (returned to the system, or kept for reuse).
REPORT = """
import json, os, resource, numpy as np, threadpoolctl
blas = lambda: sorted((i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info())
def rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def freed_block_returned():
  block = np.ones(256 << 18, np.float32)  # 256 MiB, every page touched
  held = rss()
  del block
  return held - rss() > (200 << 20)
import sys, matplotlib
plots = lambda: (str(dict.__getitem__(matplotlib.rcParams, "backend")),  # raw: unresolved
                 "matplotlib.pyplot" in sys.modules)
before = {"env": dict(os.environ), "blas": blas(), "returned": freed_block_returned(),
          "plots": plots()}
import sdl, sdl.parallel, sdl.models, sdl.data, sdl.optim, sdl.train, sdl.bench, sdl.kernels
import sdl.models.cosmoflow, sdl.optim.kfac, sdl.train.loop, sdl.train.plots
import sdl.bench.roofline, sdl.bench.suite, sdl.kernels.checksum, sdl.data.store
after = {"env": dict(os.environ), "blas": blas(), "returned": freed_block_returned(),
         "plots": plots()}
from sdl import process
record = process.configure()
configured = {"env": dict(os.environ), "blas": blas(), "returned": freed_block_returned(),
              "record": record}
print(json.dumps({"before": before, "after": after, "configured": configured}))
"""


def report(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("SDL_KEEP_FREED_MEMORY", "SDL_PROCESS_SETTINGS", "XLA_FLAGS",
                        "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                        *host_memory.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True,
                       env={**clean, **env}, timeout=180, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the allocator check is glibc's")
def test_import_sdl_leaves_the_process_as_it_was_and_configure_changes_it():
  r = report()
  before, after, configured = r["before"], r["after"], r["configured"]
  assert after["env"] == before["env"]
  assert "XLA_FLAGS" not in after["env"]
  assert after["blas"] == before["blas"]
  # a notebook's inline plots keep working: no backend chosen, no pyplot loaded
  assert after["plots"] == before["plots"] and not after["plots"][1], after["plots"]
  assert before["returned"] and after["returned"]  # glibc unmapped the freed block
  # The positive control: the same checks see what configure() does.
  record = configured["record"]
  assert record["enabled"] and record["allocator"]
  assert not configured["returned"]  # kept for reuse
  assert not record["openblas_idle"]  # numpy came first: too late, and it says so
  assert configured["env"].get("XLA_FLAGS", "") == record["xla_flags"]
  changed = dict(configured["blas"])
  assert all(changed[path] == 1 for path in record["lapack_threads"])
  if sys.platform == "linux" and os.cpu_count() > 1:
    assert record["lapack_threads"] and configured["blas"] != before["blas"]


def test_configure_can_be_turned_off_from_the_command_line_or_the_environment():
  assert process.enabled_by([], {})
  assert not process.enabled_by(["x", "--config.process.configure=False"], {})
  assert not process.enabled_by([], {"SDL_PROCESS_SETTINGS": "0"})
  assert process.enabled_by(["--config.process.configure=True"], {"SDL_PROCESS_SETTINGS": "0"})
  code = ("import sys, experiments, json; "
          "print(json.dumps([experiments.PROCESS_SETTINGS, 'numpy' in sys.modules]))")
  clean = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_THREAD_TIMEOUT", "SDL_PROCESS_SETTINGS")}
  run = lambda *argv: json.loads(subprocess.run(
      [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=clean,
      timeout=120, check=True).stdout.strip().splitlines()[-1])
  on, _ = run()
  assert on["enabled"] and on["openblas_idle"]  # before numpy: in time
  off, _ = run("--config.process.configure=False")
  assert not off["enabled"] and off["allocator"] is None
