"""Seconds of a cross-process all-reduce, as one process of a job (`sdl.launch` starts them).

    python -m sdl.launch -n 4 --cpu_devices 1 -- python -m experiments.all_reduce_bench \
        --bytes=65536,1048576,16777216

One device per process, a `("data",)` mesh over all of them; for each size, the median of
`--runs` timed all-reduces of a float32 buffer that size (after one untimed). Process 0
prints one line per size, `all_reduce bytes=N processes=P seconds=S`, which
`experiments.kfac_scaling` reads.
"""
from absl import app, flags

from sdl.parallel import distributed

_BYTES = flags.DEFINE_list("bytes", ["65536", "1048576", "16777216"], "buffer sizes")
_RUNS = flags.DEFINE_integer("runs", 7, "timed all-reduces per size")


def main(argv):
  del argv
  distributed.initialize(distributed.detect())
  import time  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  spec = P("data")
  run = jax.jit(jax.shard_map(lambda v: lax.psum(v, "data"), mesh=mesh, in_specs=spec,
                              out_specs=spec))
  for nbytes in (int(b) for b in _BYTES.value):
    n = nbytes // 4
    x = jax.make_array_from_callback((jax.device_count() * n,), NamedSharding(mesh, spec),
                                     lambda i: np.ones(n, np.float32))
    jax.block_until_ready(run(x))
    distributed.barrier(f"all-reduce-bench-{nbytes}")
    times = []
    for _ in range(_RUNS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(run(x))
      times.append(time.perf_counter() - t0)
    if jax.process_index() == 0:
      print(f"all_reduce bytes={nbytes} processes={jax.process_count()} "
            f"seconds={float(np.median(times)):.6g}", flush=True)



if __name__ == "__main__":
  app.run(main)
