"""The CosmoFlow trainer, top to bottom: validate, mesh, data, model, step, loop.

Hybrid data x spatial parallelism: the batch is split over the `data` mesh axis and each
volume's depth over `spatial`; XLA's SPMD partitioner exchanges the convolution halos.
Parameters and optimiser state are replicated. After `model.spatial_layers` conv/pool
layers the activations are constrained to pure data parallelism.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdl.data import synthetic, universes
from sdl.models.cosmoflow import VARIANTS, CosmoFlow, resolve_spatial_layers
from sdl.optim import make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.parallel.mesh import check_mesh_config, resolve_mesh_shape
from sdl.parallel.sharding import VOLUME_AXES
from sdl.train import loop
from sdl.train.checkpoint import abstract_like
from sdl.train.state import TrainState, make_eval_step, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a validated config resolves to."""
  mesh_shape: tuple[int, ...]
  data_shards: int
  depth_shards: int
  spatial_layers: int


def validate(config, num_devices: int) -> Plan:
  """Every check that can fail before compiling; errors name the field and the fix."""
  m, d, t = config.model, config.data, config.train
  if m.variant not in VARIANTS:
    raise ConfigError(f"model.variant={m.variant!r}: choose one of {VARIANTS}")
  if m.compute_dtype not in DTYPES:
    raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}: choose one of {tuple(DTYPES)}")
  check_mesh_config(config.mesh.shape, config.mesh.axes, num_devices)
  shape = resolve_mesh_shape(config.mesh.shape, num_devices)
  sizes = dict(zip(config.mesh.axes, shape))
  data, depth, height = sizes.get("data", 1), sizes.get("spatial", 1), sizes.get("spatial_h", 1)
  if t.batch_size % data:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by the 'data' mesh axis ({data} "
        f"devices); use a multiple of {data} or change mesh.shape")
  if d.input_size > d.universe_size:
    raise ConfigError(f"data.input_size={d.input_size} exceeds data.universe_size="
                      f"{d.universe_size}; crops are cut from universes")
  layers = resolve_spatial_layers(m.variant, d.input_size, depth, height, m.spatial_layers)
  return Plan(shape, data, depth, layers)


def build_model(config, plan: Plan, partitioner: Partitioner | None) -> CosmoFlow:
  return CosmoFlow(variant=config.model.variant, input_size=config.data.input_size,
                   spatial_layers=plan.spatial_layers, partitioner=partitioner,
                   dtype=DTYPES[config.model.compute_dtype])


def make_loss_fn(model: CosmoFlow):
  def loss_fn(params, batch, rng, train):
    pred = model.apply({"params": params}, batch["volume"], train=train,
                       rngs={"dropout": rng} if train else None)
    err = pred - batch["label"]
    return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err)),
                                "mae_param": jnp.mean(jnp.abs(err), axis=0)}
  return loss_fn


def make_datasets(config):
  d = config.data
  spec = universes.UniverseSpec(d.universe_size, d.cell_mpc, d.particles_per_voxel)
  base = config.seed * 1_000_003  # disjoint universe seeds per experiment seed
  train = synthetic.make_dataset(range(base, base + d.train_universes), spec, d.input_size,
                                 d.crops_per_universe, desc="training universes")
  val = synthetic.make_dataset(range(base + d.train_universes,
                                     base + d.train_universes + d.val_universes),
                               spec, d.input_size, d.crops_per_universe,
                               desc="validation universes")
  return train, val


def global_batch(volumes: np.ndarray, labels: np.ndarray, shardings: dict) -> dict:
  """Assemble the global batch; each process only materialises its addressable shards."""
  host = {"volume": volumes, "label": labels}
  return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
          for k, v in host.items()}


@dataclasses.dataclass(frozen=True)
class Compiled:
  """The jitted pieces of a CosmoFlow run on one mesh."""
  model: CosmoFlow
  init_state: Callable[[], TrainState]
  train_step: Callable
  eval_step: Callable
  schedule: Callable[[int], float]
  abstract_state: TrainState  # shapes + shardings, for restores and memory analysis
  batch_sharding: dict


def build(config, plan: Plan, mesh) -> Compiled:
  """Model, optimiser and the jitted init/train/eval functions with explicit shardings."""
  part = Partitioner.create(mesh)
  model = build_model(config, plan, part)
  loss_fn = make_loss_fn(model)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  size = config.data.input_size
  sample = jnp.zeros((1, size, size, size, len(universes.REDSHIFTS)), jnp.int16)

  def init():
    key = jax.random.PRNGKey(config.seed)
    params = model.init(key, sample)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      jax.random.fold_in(key, 1))

  # Parameters and optimiser state are replicated; they are created directly in place.
  state_shape = jax.eval_shape(init)
  state_sharding = jax.tree.map(lambda _: part.replicated(), state_shape)
  batch_sharding = {"volume": part.sharding(VOLUME_AXES), "label": part.sharding(("batch", None))}
  train_step = jax.jit(make_train_step(loss_fn, tx), in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, part.replicated()), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(loss_fn), in_shardings=(state_sharding.params, batch_sharding),
                      out_shardings=part.replicated())
  return Compiled(model, jax.jit(init, out_shardings=state_sharding), train_step, eval_step,
                  schedule, abstract_like(state_shape, state_sharding), batch_sharding)


def abstract_batch(config, batch_sharding: dict) -> dict:
  size, batch = config.data.input_size, config.train.batch_size
  return {"volume": jax.ShapeDtypeStruct((batch, size, size, size, len(universes.REDSHIFTS)),
                                         jnp.int16, sharding=batch_sharding["volume"]),
          "label": jax.ShapeDtypeStruct((batch, 4), jnp.float32, sharding=batch_sharding["label"])}


def run(config, workdir: str, *, datasets=None, hooks=()) -> TrainState:
  """Train CosmoFlow as `config` says, in `workdir` (resuming if it holds checkpoints)."""
  plan = validate(config, jax.device_count())
  mesh = make_mesh(plan.mesh_shape, config.mesh.axes)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{plan.spatial_layers} conv/pool layers depth-split", flush=True)
  train_set, val_set = datasets or make_datasets(config)
  c = build(config, plan, mesh)
  batch_size = config.train.batch_size
  sampler = synthetic.EpochSampler(len(train_set), batch_size, config.seed)

  def get_batch(step):
    idx = np.sort(sampler.indices(step))  # sorted: cheaper gathers, same set of samples
    return global_batch(train_set.volumes[idx], train_set.labels[idx], c.batch_sharding)

  def evaluate(params):
    n = len(val_set) // batch_size
    if n == 0:
      raise ConfigError(f"data.val_universes x data.crops_per_universe = {len(val_set)} "
                        f"validation samples is fewer than train.batch_size={batch_size}")
    sums = None
    for b in range(n):
      sl = slice(b * batch_size, (b + 1) * batch_size)
      out = jax.device_get(c.eval_step(params, global_batch(
          val_set.volumes[sl], val_set.labels[sl], c.batch_sharding)))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    return loop.scalars(sums, n)

  return loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                  abstract_state=c.abstract_state, train_step=c.train_step, get_batch=get_batch,
                  evaluate=evaluate, schedule=c.schedule, hooks=hooks)
