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
