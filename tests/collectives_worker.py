"""One process of tests/test_multiprocess.py's collectives check (a script, not a test).

Run by `python -m sdl.launch -n 2 --cpu_devices 2 -- python tests/collectives_worker.py OUT
LATE_SECONDS`: joins the job the launcher describes, runs cross-process collectives on
buffers of 4 MiB chunks over a 2 x 2 (node x local) mesh, and saves what this process's
devices hold to OUT/process_<i>.npz. Then process 1 arrives LATE_SECONDS late at a
`sdl.parallel.distributed.barrier` followed by another collective.
"""
import sys
import time

from sdl.parallel import distributed

distributed.initialize(distributed.detect())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sdl.parallel.collectives import all_reduce_sum, reduce_scatter  # noqa: E402

out, late = sys.argv[1], float(sys.argv[2])
assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(),
                                                               jax.device_count())
CHUNK = 1 << 20  # float32s: 4 MiB, far past the 256 KiB where gloo's reduce-scatter broke
# node x local with `local` across the processes: every collective below crosses them
mesh = Mesh(np.array(jax.devices()).reshape(2, 2).T, ("node", "local"))
inputs = np.random.default_rng(0).standard_normal((2, 2, 4 * CHUNK)).astype(np.float32)
spec = P("node", "local")
x = jax.make_array_from_callback(inputs.shape, NamedSharding(mesh, spec), lambda i: inputs[i])


def collectives(v):
  v = v[0, 0]
  return (lax.psum(v, ("node", "local"))[None, None],
          reduce_scatter(v, ("node", "local"))[None, None],
          reduce_scatter(v, "local")[None, None],
          jax.tree.map(lambda t: t[None, None],
                       all_reduce_sum({"a": v[:CHUNK], "b": v[CHUNK:]}, ("node", "local"))),
          all_reduce_sum(v, ("node",), jnp.bfloat16)[None, None])


run = jax.jit(jax.shard_map(collectives, mesh=mesh, in_specs=spec,
                            out_specs=(spec,) * 5))
names = ("psum", "reduce_scatter", "reduce_scatter_local", "hierarchical", "psum_node_bf16")
saved = {}
for name, result in zip(names, run(x)):
  for key, leaf in (result.items() if isinstance(result, dict) else [("", result)]):
    for shard in leaf.addressable_shards:
      where = ",".join(str(s.start or 0) for s in shard.index)
      saved[f"{name}{'/' + key if key else ''}@{where}"] = np.asarray(shard.data)

# Arriving late: gloo alone gives up after 30 s; the barrier waits on the coordinator.
if jax.process_index() == 1:
  time.sleep(late)
t0 = time.perf_counter()
distributed.barrier("collectives-worker-late")
saved["barrier_wait_s"] = np.array(time.perf_counter() - t0)
after, *_ = run(x)
saved["after_late@0,0"] = np.asarray(after.addressable_shards[0].data)
np.savez(f"{out}/process_{jax.process_index()}.npz", **saved)
