"""Two processes on localhost (jax.distributed, gloo): disjoint reads, the same global batches."""
import os
import socket
import subprocess
import sys

import numpy as np

from sdl.data import store
from sdl.data.sampler import EpochSampler
from tests.test_data_store import random_volumes, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_halves_of_the_same_batches(tmp_path):
  volumes, labels = random_volumes(8, shape=(8, 8, 4, 4), seed=4)
  path = write(tmp_path / "ds", volumes, labels, chunk_depth=4)
  port = str(free_port())
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  worker = os.path.join(ROOT, "tests", "distributed_io_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), port, path,
                             str(tmp_path / f"p{i}.npz")],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  results = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]

  sampler = EpochSampler(8, 4, seed=7)
  sample_bytes = volumes[0].nbytes
  for name in ("disk", "memory"):
    for step in range(3):
      want = volumes[np.sort(sampler.indices(step))]
      covered = np.zeros(want.shape, int)
      for process, saved in enumerate(results):
        mine = {k: v for k, v in saved.items() if k.startswith(f"{name}/{step}/")}
        assert len(mine) == 2  # this process's two devices
        for key, data in mine.items():
          starts = [int(x) for x in key.split("/")[3].strip("[]").split(",")]
          region = tuple(slice(s, s + n) for s, n in zip(starts, data.shape))
          np.testing.assert_array_equal(data, want[region])
          covered[region] += 1
      assert (covered == 1).all()  # together: the whole global batch, each voxel once
  for saved in results:
    # Store: half the dataset each. Disk: 3 steps x half of each batch of 4.
    assert int(saved["bytes_for_store"]) == 4 * sample_bytes
    assert int(saved["bytes_total"]) - int(saved["bytes_for_store"]) == 3 * 2 * sample_bytes
  assert store.open_dataset(path).bytes_read == 0
