"""Per-device memory of the 3D U-Net train step as the depth split P grows.

    python -m experiments.unet3d_memory [--size=256] [--batch=1] [--splits=1,2,4,8] \
        [--widths=lbann|half] [--params=fsdp|replicated] [--layouts=auto]

Compiles (does not run) the full train step (forward, backward, Adam update, donated
state) of LBANN's unet3d on a `1 x P` data x spatial mesh of P virtual CPU devices, and
prints XLA's buffer assignment per device. The target (issue 26): at most 1.1/P of P = 1
at P = 4 and 8. Beside it, `sdl.bench.volume_model`'s prediction for the same layouts, its
one parameter (`copies`) read from XLA at the first P, and the halo bytes it predicts
against those of the compiled step's collective-permutes.
"""
from absl import app, flags

from sdl.bench import volume_model
from sdl.parallel import ensure_cpu_devices

_SIZE = flags.DEFINE_integer("size", 256, "Volume side in voxels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Global batch size.")
_SPLITS = flags.DEFINE_list("splits", ["1", "2", "4", "8"], "Depth splits P to compare.")
_WIDTHS = flags.DEFINE_enum("widths", "lbann", ["lbann", "half"], "LBANN's widths or half.")
_PARAMS = flags.DEFINE_enum("params", "fsdp", ["replicated", "fsdp"], "mesh.params.")
_LAYOUTS = flags.DEFINE_string("layouts", "auto", "model.layouts.")
TARGETS = {4: 1.1 / 4, 8: 1.1 / 8}


def measure(size: int, batch: int, splits: int, widths: str, params: str, layouts: str):
  """(layouts, footprint, halo bytes sent per device, the volume model's stages, plan) of
  the train step on a 1 x `splits` mesh, compiled only."""
  import jax  # noqa: PLC0415

  from experiments.configs.unet3d import get_config  # noqa: PLC0415
  from experiments.trainers import unet3d  # noqa: PLC0415
  from sdl.bench import volume_model  # noqa: PLC0415
  from sdl.bench.hlo import collective_bytes  # noqa: PLC0415
  from sdl.bench.memory import footprint  # noqa: PLC0415
  from sdl.parallel import make_mesh  # noqa: PLC0415

  config = get_config("large")
  config.model.compute_dtype = "float32"
  if widths == "half":
    config.model.down = ((16, 32), (32, 64), (64, 128))
    config.model.bottom = (128, 256)
  config.model.layouts = layouts
  config.data.crop_size = size
  config.train.batch_size = batch
  config.mesh.update(shape=(1, splits), params=params)
  plan = unet3d.validate(config, splits)
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes, devices=jax.devices()[:splits])
  c = unet3d.build(config, plan, mesh)
  sample = unet3d.sample_batch(config, batch)
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=c.batch_sharding[k])
              for k, v in sample.items()}
  compiled = c.train_step.lower(c.abstract_state, abstract).compile()
  m = config.model
  stages, stage_splits = volume_model.unet3d_stages(m.down, m.bottom, sample["volume"].shape[-1],
                                                    m.classes, plan.layouts, splits)
  model_plan = volume_model.Plan(size, sample["volume"].shape[-1], batch, splits, 0,
                                 devices=splits, fsdp=params == "fsdp",
                                 stage_splits=stage_splits)
  return (plan.layouts, footprint(compiled), collective_bytes(compiled.as_text(),
                                                              "collective-permute"),
          stages, model_plan)


def main(argv):
  del argv
  splits = [int(p) for p in _SPLITS.value]
  ensure_cpu_devices(max(splits))
  mib = lambda b: f"{b / 2 ** 20:,.1f}"
  print(f"3D U-Net ({_WIDTHS.value} widths) {_SIZE.value}^3 x 1, batch {_BATCH.value}, params "
        f"{_PARAMS.value}: train step memory per device (XLA buffer assignment, MiB)")
  table = ["| P | layouts | arguments | temporaries | total | vs P=1 | target | volume model "
           "| model / XLA | halo model / HLO (MiB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  print("\n".join(table), flush=True)
  base, copies, verdicts = None, None, []
  for p in splits:
    layouts, fp, halo, stages, plan = measure(_SIZE.value, _BATCH.value, p, _WIDTHS.value,
                                              _PARAMS.value, _LAYOUTS.value)
    base = base or fp.total
    copies = copies or volume_model.calibrate(stages, (), plan, fp.total)
    model = volume_model.predict(stages, (), plan, copies)
    ratio = fp.total / base
    target = f"≤ {TARGETS[p]:.4f}" if p in TARGETS else ""
    split = sum(v != "data" for v in layouts)
    print(f"| {p} | {split}/{len(layouts)} split | {mib(fp.arguments)} | "
          f"{mib(fp.temporaries)} | {mib(fp.total)} | {ratio:.4f} | {target} | "
          f"{mib(model['total'])} | {model['total'] / fp.total:.2f} | "
          f"{mib(model['halo'])} / {mib(halo)} |", flush=True)
    if p in TARGETS:
      verdicts.append(f"P={p}: {ratio:.4f} vs {TARGETS[p]:.4f} "
                      f"({'meets' if ratio <= TARGETS[p] else 'misses'})")
  for v in verdicts:
    print("target:", v)


if __name__ == "__main__":
  app.run(main)
