"""The CosmoFlow trainer, top to bottom: validate, mesh, data, model, step, loop.

Hybrid data x spatial parallelism: the batch is split over the `data` mesh axis and each
volume's depth over `spatial`; XLA's SPMD partitioner exchanges the convolution halos.
Parameters and optimiser state are replicated. After `model.spatial_layers` conv/pool
layers the activations are constrained to pure data parallelism.
"""
import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdl.data import loader, memory_store, store, synthetic, universes
from sdl.models.conv import LOWERINGS
from sdl.models.cosmoflow import VARIANTS, CosmoFlow, resolve_spatial_layers
from sdl.optim import make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.parallel.mesh import check_mesh_config, resolve_mesh_shape
from sdl.parallel.sharding import VOLUME_AXES
from sdl.train import loop
from sdl.train.checkpoint import abstract_like
from sdl.train.state import TrainState, make_eval_step, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SOURCES = ("generate", "disk", "memory")


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
  if m.conv_lowering not in LOWERINGS:
    raise ConfigError(f"model.conv_lowering={m.conv_lowering!r}: choose one of {LOWERINGS}")
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
  if d.source not in SOURCES:
    raise ConfigError(f"data.source={d.source!r}: choose one of {SOURCES}")
  if d.source != "generate" and not d.path:
    raise ConfigError(f"data.source={d.source!r} reads a dataset: set data.path to a directory "
                      "written by `python -m experiments.make_dataset`")
  layers = resolve_spatial_layers(m.variant, d.input_size, depth, height, m.spatial_layers)
  return Plan(shape, data, depth, layers)


def build_model(config, plan: Plan, partitioner: Partitioner | None) -> CosmoFlow:
  return CosmoFlow(variant=config.model.variant, input_size=config.data.input_size,
                   spatial_layers=plan.spatial_layers, partitioner=partitioner,
                   dtype=DTYPES[config.model.compute_dtype],
                   conv_lowering=config.model.conv_lowering)


def make_loss_fn(model: CosmoFlow):
  def loss_fn(params, batch, rng, train):
    pred = model.apply({"params": params}, batch["volume"], train=train,
                       rngs={"dropout": rng} if train else None)
    err = pred - batch["label"]
    return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err)),
                                "mae_param": jnp.mean(jnp.abs(err), axis=0)}
  return loss_fn


def universe_seeds(config) -> tuple[range, range]:
  """Training and validation universe seeds: disjoint, and disjoint across `config.seed`."""
  d = config.data
  base = config.seed * 1_000_003
  return (range(base, base + d.train_universes),
          range(base + d.train_universes, base + d.train_universes + d.val_universes))


def make_datasets(config):
  d = config.data
  spec = universes.UniverseSpec(d.universe_size, d.cell_mpc, d.particles_per_voxel)
  return tuple(synthetic.make_dataset(seeds, spec, d.input_size, d.crops_per_universe,
                                      desc=f"{name} universes")
               for name, seeds in zip(("training", "validation"), universe_seeds(config)))


def write_datasets(config, out: str, *, overwrite: bool = False, checksum: bool = False):
  """Write what `make_datasets(config)` generates to `out/train` and `out/val`."""
  d = config.data
  spec = universes.UniverseSpec(d.universe_size, d.cell_mpc, d.particles_per_voxel)
  return tuple(synthetic.write_dataset(os.path.join(out, split), seeds, spec, d.input_size,
                                       d.crops_per_universe, desc=f"{split} universes",
                                       overwrite=overwrite, checksum=checksum)
               for split, seeds in zip(("train", "val"), universe_seeds(config)))


def open_datasets(config) -> tuple[store.Dataset, store.Dataset]:
  """The `train/` and `val/` datasets under `data.path`, checked against the config."""
  datasets = tuple(store.open_dataset(os.path.join(config.data.path, split))
                   for split in ("train", "val"))
  size = config.data.input_size
  for ds in datasets:
    expect = (size,) * 3 + (len(universes.REDSHIFTS),)
    if ds.volume_shape != expect:
      raise ConfigError(f"{ds.path} holds volumes of {list(ds.volume_shape)} but "
                        f"data.input_size={size} needs {list(expect)}; set data.input_size="
                        f"{ds.volume_shape[0]} or write a dataset of that size")
  return datasets


def make_sources(config, batch_sharding: dict, datasets=None):
  """Training and validation batch sources for `data.source` (see `sdl.data.loader`)."""
  source = config.data.source
  if source == "generate":
    train, val = datasets or make_datasets(config)
    return (loader.ArraySource(train.volumes, train.labels, batch_sharding),
            loader.ArraySource(val.volumes, val.labels, batch_sharding))
  train, val = open_datasets(config)
  if source == "memory":
    print(f"loading {len(train)} samples into device memory ...", flush=True)
    return (memory_store.DistributedStore.load(train, batch_sharding),
            loader.ShardedReader(val, batch_sharding))
  return loader.ShardedReader(train, batch_sharding), loader.ShardedReader(val, batch_sharding)


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
  c = build(config, plan, mesh)
  train_source, val_source = make_sources(config, c.batch_sharding, datasets)
  batch_size = config.train.batch_size
  sampler = synthetic.EpochSampler(len(train_source), batch_size, config.seed)
  # Sorted: cheaper gathers and reads, the same set of samples.
  get_batch = loader.Prefetcher(lambda step: train_source.batch(np.sort(sampler.indices(step))),
                                depth=config.data.prefetch)

  def evaluate(params):
    n = len(val_source) // batch_size
    if n == 0:
      raise ConfigError(f"{len(val_source)} validation samples are fewer than "
                        f"train.batch_size={batch_size}; add validation data")
    sums = None
    for b in range(n):
      batch = val_source.batch(np.arange(b * batch_size, (b + 1) * batch_size))
      out = jax.device_get(c.eval_step(params, batch))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    return loop.scalars(sums, n)

  try:
    state = loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                     abstract_state=c.abstract_state, train_step=c.train_step,
                     get_batch=get_batch, evaluate=evaluate, schedule=c.schedule, hooks=hooks)
  finally:
    get_batch.close()
  print(f"input pipeline ({config.data.source}): the loop waited {get_batch.wait_seconds:.2f} s "
        f"for {get_batch.batches} batches", flush=True)
  return state
