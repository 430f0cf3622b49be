"""sdl.host_memory: after `sdl.process.configure()`, a jitted call's large output buffer is reused from
glibc's heap, not mapped afresh and faulted in page by page on every call; opting out
gives the faults back (so the count below can tell the two apart)."""
import json
import os
import subprocess
import sys

import pytest

from sdl import host_memory

# Minor page faults of each of 20 calls returning a fresh 64 MiB array (above glibc's
# largest mmap threshold, 32 MiB), and the result's first and last values. With memory
# kept, most calls reuse freed heap and fault nothing, but the heap still grows by a
# buffer on some calls, early and now and then later (fragmentation): in 15 runs on the
# 2-core VM, 9-17 of the 20 calls faulted nothing, and one CI run's 20th call grew the
# heap. Opted out, every call maps and faults in all of its pages.
REPORT = """
import json, resource
from sdl import process
kept = process.configure()["allocator"]
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((16, 1024, 1024), jnp.float32)  # 64 MiB
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  first, last = float(y[0, 0, 0]), float(y[-1, -1, -1])
  del y
print(json.dumps({"faults": faults, "values": [first, last], "kept": kept}))
"""
PAGES = (64 << 20) // 4096


def report(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("SDL_KEEP_FREED_MEMORY", *host_memory.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True,
                       env={**clean, **env}, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's (Linux)")
def test_large_buffers_are_reused_without_page_faults():
  kept, unmapped = report(), report(SDL_KEEP_FREED_MEMORY="0")
  assert kept["kept"] and not unmapped["kept"]
  assert kept["values"] == unmapped["values"] == [3.0, 3.0]
  assert min(unmapped["faults"]) >= 0.9 * PAGES, unmapped  # each call maps new pages
  reused = sum(faults < 0.01 * PAGES for faults in kept["faults"])
  assert reused >= 5, kept  # calls that mapped nothing new (none of them opted out)


def test_opt_outs_leave_the_allocator_alone():
  assert not host_memory.keep_freed_memory({"SDL_KEEP_FREED_MEMORY": "0"})
  assert not host_memory.keep_freed_memory({"SDL_KEEP_FREED_MEMORY": "off"})
  for name in host_memory.OPT_OUT:  # glibc's own variables: the user's choice stands
    assert not host_memory.keep_freed_memory({name: "65536"})
