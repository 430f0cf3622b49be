"""Per-device memory of the CosmoFlow train step as the depth split P grows.

    python -m experiments.cosmoflow_memory [--variant=lbann] [--size=256] [--batch=1] \
        [--splits=1,2,4,8]

Compiles (does not run) the full train step — forward, backward, optimiser update, with
donated state — for a `1 x P` data x spatial mesh on P virtual CPU devices, and prints XLA's
buffer assignment per device. Spatial partitioning exists to make this number shrink with P.
"""
from absl import app, flags

from sdl.parallel import ensure_cpu_devices

_VARIANT = flags.DEFINE_enum("variant", "lbann", ["lbann", "mlperf"], "CosmoFlow network.")
_SIZE = flags.DEFINE_integer("size", 256, "Input side in voxels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Global batch size.")
_SPLITS = flags.DEFINE_list("splits", ["1", "2", "4", "8"], "Depth splits P to compare.")


def measure(variant: str, size: int, batch: int, splits: int):
  """Footprint of the train step on a 1 x `splits` mesh (first `splits` devices)."""
  import jax  # noqa: PLC0415

  from experiments.configs.cosmoflow import get_config  # noqa: PLC0415
  from experiments.trainers import cosmoflow  # noqa: PLC0415
  from sdl.bench.memory import footprint  # noqa: PLC0415
  from sdl.parallel import make_mesh  # noqa: PLC0415

  config = get_config("lbann")
  config.model.variant = variant
  config.data.update(input_size=size, universe_size=size)
  config.train.batch_size = batch
  config.mesh.shape = (1, splits)
  plan = cosmoflow.validate(config, splits)
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes, devices=jax.devices()[:splits])
  c = cosmoflow.build(config, plan, mesh)
  compiled = c.train_step.lower(c.abstract_state,
                                cosmoflow.abstract_batch(config, c.batch_sharding)).compile()
  return plan, footprint(compiled)


def main(argv):
  del argv
  splits = [int(p) for p in _SPLITS.value]
  ensure_cpu_devices(max(splits))
  rows, base = [], None
  print(f"CosmoFlow {_VARIANT.value} {_SIZE.value}^3 x 4, batch {_BATCH.value}: train step "
        "memory per device (XLA buffer assignment, MiB)")
  print("| P | depth-split layers | arguments | outputs (aliased) | temporaries | total | vs P=1 |")
  print("|---|---|---|---|---|---|---|")
  for p in splits:
    plan, fp = measure(_VARIANT.value, _SIZE.value, _BATCH.value, p)
    base = base or fp.total
    mib = lambda b: f"{b / 2 ** 20:,.1f}"
    rows.append((p, fp.total / base))
    print(f"| {p} | {plan.spatial_layers} | {mib(fp.arguments)} | {mib(fp.outputs)} "
          f"({mib(fp.aliased)}) | {mib(fp.temporaries)} | {mib(fp.total)} | "
          f"{fp.total / base:.4f} |", flush=True)
  for p, ratio in rows:
    if p == 4:
      verdict = "meets" if ratio <= 0.35 else "misses"
      print(f"target: P=4 footprint <= 0.35 x P=1: {ratio:.4f} ({verdict})")


if __name__ == "__main__":
  app.run(main)
