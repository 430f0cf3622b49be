"""The CosmoFlow train step's per-device memory on a `1 x P` mesh, compiled, not run: the
measurement behind `experiments.cosmoflow_memory` (which adds flags and the table) and
`tests/test_memory.py`."""


# The targets of issue 22 (per-device footprint vs P=1, the default CPU lowering, lbann 256³):
# within 10 % of 1/P at P = 4 and 8, and at most 0.55 at P = 2.
TARGETS = {2: 0.55, 4: 0.275, 8: 0.14}


def lowered_step(variant: str, size: int, batch: int, splits: int, lowering: str = "auto",
                 params: str | None = None):
  """(plan, lowered train step) of CosmoFlow on a 1 x `splits` mesh of CPU devices."""
  import jax  # noqa: PLC0415

  from experiments.configs.cosmoflow import get_config  # noqa: PLC0415
  from experiments.trainers import cosmoflow  # noqa: PLC0415
  from sdl.parallel import make_mesh  # noqa: PLC0415

  config = get_config("lbann")
  config.model.variant = variant
  config.model.conv_lowering = lowering
  config.data.update(input_size=size, universe_size=size)
  config.train.batch_size = batch
  config.mesh.shape = (1, splits)
  if params is not None:
    config.mesh.params = params
  plan = cosmoflow.validate(config, splits)
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes, devices=jax.devices()[:splits])
  c = cosmoflow.build(config, plan, mesh)
  return plan, c.train_step.lower(c.abstract_state,
                                  cosmoflow.abstract_batch(config, c.batch_sharding))


def measure(variant: str, size: int, batch: int, splits: int, lowering: str = "auto",
            params: str | None = None, peak: int = 0):
  """(plan, footprint, buffers at the peak) of the train step on a 1 x `splits` mesh."""
  from sdl.bench.memory import footprint, peak_buffers  # noqa: PLC0415

  plan, lowered = lowered_step(variant, size, batch, splits, lowering, params)
  if peak:
    compiled, buffers = peak_buffers(lowered, peak)
  else:
    compiled, buffers = lowered.compile(), []
  return plan, footprint(compiled), buffers


def volume_model_rows(variant: str, size: int, batch: int, splits, params: str) -> list[dict]:
  """One row per P: XLA's per-device bytes and the bytes of the compiled step's
  collective-permutes, beside `sdl.bench.volume_model`'s (its `copies` read at P = 1);
  `experiments.volume_model_check` prints them."""
  from sdl.bench import volume_model  # noqa: PLC0415
  from sdl.bench.hlo import collective_bytes  # noqa: PLC0415
  from sdl.bench.memory import footprint  # noqa: PLC0415

  stages, head = volume_model.cosmoflow_stages(variant, size)
  rows, copies = [], None
  for p in splits:
    plan, lowered = lowered_step(variant, size, batch, p, params=params)
    compiled = lowered.compile()
    total = footprint(compiled).total
    model_plan = volume_model.Plan(size, 4, batch, p, plan.spatial_layers, devices=p,
                                   fsdp=params == "fsdp")
    if copies is None:
      copies = volume_model.calibrate(stages, head, model_plan, total)
    predicted = volume_model.predict(stages, head, model_plan, copies)
    rows.append({"splits": p, "spatial_layers": plan.spatial_layers, "xla": total,
                 "model": predicted["total"], "copies": copies,
                 "halo_model": predicted["halo"],
                 "halo_hlo": collective_bytes(compiled.as_text(), "collective-permute")})
  return rows
