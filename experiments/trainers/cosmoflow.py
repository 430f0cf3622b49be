"""The CosmoFlow trainer, top to bottom: validate, mesh, data, model, step, loop.

Hybrid data x spatial parallelism: the batch is split over the mesh axis that the `batch`
rule names (`data`) and each volume's depth over the one `depth` names (`spatial`); XLA's
SPMD partitioner exchanges the convolution halos. Parameters and optimiser state are
replicated, or split FSDP-style over `data` (`config.mesh.params`). After
`model.spatial_layers` conv/pool layers the activations are constrained to pure data
parallelism. Fork this file to train another model family on the same library.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdl import xla_flags
from sdl.data import cosmoflow as data
from sdl.data import augment, loader
from sdl.data.sampler import EpochSampler
from sdl.kernels import conv3d as direct_kernels
from sdl.models.conv import LOWERINGS
from sdl.models import slabs as slabs_lib
from sdl.models.cosmoflow import (HEAD, HEAD_NORM_MOMENTUM, HEADS, VARIANTS, CosmoFlow,
                                  feature_layers, head_widths, remat_blocks,
                                  resolve_spatial_layers)
from sdl.optim import kfac, make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.parallel.mesh import check_mesh_config, resolve_mesh_shape
from sdl.parallel.sharding import (PARAM_SHARDINGS, VOLUME_AXES, describe_rule, logical_size,
                                   mesh_rules, rule_targets)
from sdl.train import loop
from sdl.train.checkpoint import abstract_like
from sdl.train.evaluate import evaluate
from sdl.train.step import (Model, TrainState, init_state, make_batch_stats_step, make_eval_step,
                            make_train_step, pool_batch_stats)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a validated config resolves to; the rest of the trainer reads only this."""
  mesh_shape: tuple[int, ...]
  mesh_axes: tuple[str, ...]
  rules: tuple[tuple[str, str | tuple[str, ...]], ...]
  data_shards: int
  depth_shards: int
  spatial_layers: int
  params: str


def validate(config, num_devices: int) -> Plan:
  """Every check that can fail before compiling; errors name the field and the fix."""
  m, d, t = config.model, config.data, config.train
  if m.variant not in VARIANTS:
    raise ConfigError(f"model.variant={m.variant!r}: choose one of {VARIANTS}")
  if m.compute_dtype not in DTYPES:
    raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}: choose one of {tuple(DTYPES)}")
  if m.get("save_dtype", "auto") not in ("auto", *DTYPES):
    raise ConfigError(f"model.save_dtype={m.save_dtype!r}: choose 'auto' (as computed) or one "
                      f"of {tuple(DTYPES)} (bfloat16 keeps the convolutions' inputs for the "
                      "backward pass in half the bytes, computing in model.compute_dtype)")
  if m.get("head", "flatten") not in HEADS:
    raise ConfigError(f"model.head={m.head!r}: choose one of {HEADS} (flatten: the published "
                      "networks; pooled: batch-normalised spatial means of every convolution)")
  if m.get("head", "flatten") == "pooled" and m.get("slab_layers", 0):
    raise ConfigError(f"model.head='pooled' reads every convolution's activation, which the "
                      f"stem (model.slab_layers={m.slab_layers}) does not return: use "
                      "model.head='flatten' or model.slab_layers=0")
  if d.get("augment", False) and d.source != "generate":
    raise ConfigError(f"data.augment=True transforms volumes held in memory, but data.source="
                      f"{d.source!r} reads them from data.path: use data.source='generate' "
                      "or data.augment=False")
  if m.conv_lowering not in LOWERINGS:
    raise ConfigError(f"model.conv_lowering={m.conv_lowering!r}: choose one of {LOWERINGS}")
  check_mesh_config(config.mesh.shape, config.mesh.axes, num_devices)
  shape = resolve_mesh_shape(config.mesh.shape, num_devices)
  axes = tuple(config.mesh.axes)
  rules = mesh_rules(config.mesh.rules)
  # A rule whose mesh axis this mesh lacks leaves that logical axis unsplit (the default
  # rules name spatial_h, which a data x spatial mesh does not have).
  if not any(logical == "batch" and set(rule_targets(mesh_axis)) & set(axes)
             for logical, mesh_axis in rules):
    raise ConfigError(f"mesh.rules {rules} map 'batch' onto none of mesh.axes {axes}: add a "
                      "rule ('batch', AXIS) for the data-parallel axis, or ('batch', "
                      "(AXIS, ...)) for several (node and local)")
  if config.mesh.params not in PARAM_SHARDINGS:
    raise ConfigError(f"mesh.params={config.mesh.params!r}: choose one of {PARAM_SHARDINGS}")
  mapped = dict(rules)
  size_of = lambda logical: logical_size(rules, axes, shape, logical)
  data_shards, depth, height = size_of("batch"), size_of("depth"), size_of("height")
  if t.batch_size % data_shards:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by "
        f"{describe_rule(mapped.get('batch'))} ({data_shards} devices); use a multiple of "
        f"{data_shards} or change "
        "mesh.shape")
  loop.check_train_config(config)
  if not head_widths(m.variant, d.input_size):
    smallest = next(s for s in range(8, 1025, 8) if head_widths(m.variant, s))
    raise ConfigError(f"data.input_size={d.input_size} is too small for the {m.variant} network "
                      f"(its pools shrink it to nothing); use data.input_size>={smallest}")
  if d.input_size > d.universe_size:
    raise ConfigError(f"data.input_size={d.input_size} exceeds data.universe_size="
                      f"{d.universe_size}; crops are cut from universes")
  if d.source not in data.SOURCES:
    raise ConfigError(f"data.source={d.source!r}: choose one of {data.SOURCES}")
  if d.source != "generate" and not d.path:
    raise ConfigError(f"data.source={d.source!r} reads a dataset: set data.path to a directory "
                      "written by `python -m experiments.make_dataset`")
  if d.source == "generate" and d.val_universes * d.crops_per_universe < t.batch_size:
    raise ConfigError(
        f"the validation set (data.val_universes={d.val_universes} x data.crops_per_universe="
        f"{d.crops_per_universe} = {d.val_universes * d.crops_per_universe} samples) is smaller "
        f"than train.batch_size={t.batch_size}; add validation universes")
  if d.source == "generate" and d.train_universes * d.crops_per_universe < t.batch_size:
    raise ConfigError(
        f"the training set ({d.train_universes * d.crops_per_universe} samples) is smaller than "
        f"train.batch_size={t.batch_size}; add data.train_universes")
  dropout_of(config)
  spatial = str(m.spatial_layers)
  if spatial != "auto" and not spatial.isdigit():
    raise ConfigError(f"model.spatial_layers={m.spatial_layers!r}: give 'auto' or a number of "
                      "leading conv/pool layers")
  layers = resolve_spatial_layers(m.variant, d.input_size, depth, height, m.spatial_layers)
  check_slabs(config, depth * height)
  return Plan(shape, axes, rules, data_shards, depth, layers, config.mesh.params)


def check_slabs(config, spatial_devices: int) -> None:
  """`model.slab_layers` / `model.slabs`: the stem must exist and split evenly, and slabs
  run on whole (not depth-split) volumes."""
  m = config.model
  layers = feature_layers(m.variant, config.data.input_size)
  count, slabs = m.get("slab_layers", 0), m.get("slabs", 1)
  if not 0 <= count <= len(layers):
    raise ConfigError(f"model.slab_layers={count}: give how many leading conv/pool layers form "
                      f"the stem, 0 to {len(layers)} (0: no stem)")
  if slabs != 1 and not count:
    raise ConfigError(f"model.slabs={slabs} needs a stem to split: set model.slab_layers "
                      "(lbann at 512³: 4, its first two conv + pool blocks)")
  if slabs > 1 and spatial_devices > 1:
    raise ConfigError(f"model.slabs={slabs} runs the stem one slab at a time on each device, "
                      f"but the mesh splits the volume over {spatial_devices} devices; use "
                      "model.slabs=1 with a spatial split, or a mesh without one")
  if count:
    slabs_lib.plan([l.window for l in layers[:count]], config.data.input_size, slabs)
  remat = m.get("remat", ())
  try:
    remat_blocks(layers, remat, count)
  except ValueError as e:
    raise ConfigError(f"model.remat={tuple(remat)!r}: block {e}") from None


def build_model(config, plan: Plan, partitioner: Partitioner | None) -> CosmoFlow:
  m = config.model
  return CosmoFlow(variant=m.variant, input_size=config.data.input_size,
                   spatial_layers=plan.spatial_layers, partitioner=partitioner,
                   dtype=DTYPES[m.compute_dtype], conv_lowering=m.conv_lowering,
                   dropout=dropout_of(config), slab_layers=m.get("slab_layers", 0),
                   slabs=m.get("slabs", 1), slab_progress=m.get("slab_progress", False),
                   stem_remat=m.get("stem_remat", False), remat=tuple(
                       tuple(block) for block in m.get("remat", ())),
                   head=m.get("head", "flatten"),
                   save_dtype=(None if m.get("save_dtype", "auto") in ("auto", m.compute_dtype)
                               else DTYPES[m.save_dtype]))


def dropout_of(config) -> float | None:
  """`model.dropout`: "auto" (None: the variant's published rate) or a rate in [0, 1)
  (a number, or its string from the command line)."""
  given = config.model.get("dropout", "auto")
  if given == "auto":
    return None
  try:
    rate = float(given)
  except (TypeError, ValueError):
    rate = -1.0
  if not 0 <= rate < 1:
    raise ConfigError(f"model.dropout={given!r}: give 'auto' (the {config.model.variant} "
                      f"network's published rate, {HEAD[config.model.variant][1]}) or a rate "
                      "in [0, 1)")
  return rate


def step_model(module: CosmoFlow) -> Model:
  """How the train step calls CosmoFlow: dropout's rng only when training."""
  def kwargs(rng, train):
    return {"train": train, **({"rngs": {"dropout": rng}} if train else {})}
  return Model(module, inputs=lambda batch: (batch["volume"],), kwargs=kwargs,
               state_collections=("batch_stats",) if module.head == "pooled" else ())


def loss_fn(pred, batch):
  """Mean squared error on the four parameters; MAE overall, and both per parameter."""
  err = pred - batch["label"]
  return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err)),
                              "mae_param": jnp.mean(jnp.abs(err), axis=0),
                              "mse_param": jnp.mean(err ** 2, axis=0)}


def host_labels(source) -> np.ndarray:
  """The `[n, 4]` labels of a CosmoFlow batch source, on the host."""
  if isinstance(source, loader.ArraySource):
    return source.arrays["label"]
  if isinstance(source, loader.ShardedReader):
    return source.dataset.labels
  return source.labels  # memory_store.DistributedStore


def baseline_metrics(train_labels: np.ndarray, val_labels: np.ndarray, batch_size: int) -> dict:
  """What predicting the training-label mean scores on the samples `evaluate` visits (its
  full batches): `baseline_loss` (MSE), and `baseline_mse_param_<i>`, `baseline_mae_param_<i>`
  per parameter (in `PARAM_NAMES` order), the yardstick beside the model's `loss`, etc."""
  n = len(val_labels) // batch_size * batch_size
  err = train_labels.astype(np.float64).mean(0) - val_labels[:n]
  return {"baseline_loss": float(np.mean(err ** 2)),
          **{f"baseline_mse_param_{i}": float(v) for i, v in enumerate(np.mean(err ** 2, 0))},
          **{f"baseline_mae_param_{i}": float(v) for i, v in enumerate(np.mean(abs(err), 0))}}


@dataclasses.dataclass(frozen=True)
class Compiled:
  """The jitted pieces of a CosmoFlow run on one mesh."""
  model: CosmoFlow
  init_state: Callable[[], TrainState]
  train_step: Callable
  eval_step: Callable
  schedule: Callable[[int], float]
  phase_of: Callable[[int], object] | None
  abstract_state: TrainState  # shapes + shardings, for restores and memory analysis
  batch_sharding: dict
  batch_stats_step: Callable | None  # (params, model_state, batch) -> that batch's statistics


def build(config, plan: Plan, mesh) -> Compiled:
  """Model, optimiser and the jitted init/train/eval functions with explicit shardings."""
  part = Partitioner.create(mesh, dict(plan.rules), plan.params)
  module = build_model(config, plan, part)
  model = step_model(module)
  sample = data.sample_batch(config)
  # K-FAC's curvature products transpose the model, which sdl's direct CPU conv kernel
  # (a custom call) cannot: that pass runs with the kernel off. Its statistics are summed
  # and its inverses split by its own collectives over the mesh (`kfac.Layout`).
  spatial = part.mesh_axes("depth") + part.mesh_axes("height")
  layout = kfac.Layout(mesh, part.mesh_axes("batch"), spatial)
  optimizer = make_optimizer(config.optim, config.train.steps, model=module,
                             example=(sample["volume"],), layout=layout,
                             transposable=direct_kernels.disabled)
  init = lambda: init_state(model, optimizer.tx, sample, config.seed)

  # Created directly in its shardings, never whole on one device first.
  state_shape = jax.eval_shape(init)
  state_sharding = part.state_shardings(state_shape, plan.params)
  batch_sharding = {"volume": part.sharding(VOLUME_AXES), "label": part.sharding(("batch", None))}
  step = make_train_step(model, loss_fn, optimizer.tx, gradients=optimizer.gradients,
                         skip_nonfinite=config.train.skip_nonfinite)
  options = (xla_flags.remat_compiler_options(mesh.devices.flat[0].platform)
             if module.rematerialises else {})
  train_step = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, part.replicated()), donate_argnums=0,
                       static_argnums=2, compiler_options=options or None)  # 2: the phase
  eval_step = jax.jit(make_eval_step(model, loss_fn),
                      in_shardings=(state_sharding.params, state_sharding.model_state,
                                    batch_sharding),
                      out_shardings=part.replicated())
  batch_stats_step = (jax.jit(make_batch_stats_step(model, HEAD_NORM_MOMENTUM),
                              in_shardings=(state_sharding.params, state_sharding.model_state,
                                            batch_sharding),
                              out_shardings=state_sharding.model_state)
                      if model.state_collections else None)
  return Compiled(module, jax.jit(init, out_shardings=state_sharding), train_step, eval_step,
                  optimizer.schedule, optimizer.phase_of,
                  abstract_like(state_shape, state_sharding), batch_sharding, batch_stats_step)


# Training batches whose statistics replace the running ones before each evaluation.
PRECISE_BN_BATCHES = 16


def precise_batch_stats(c: Compiled, state: TrainState, source, batch_size: int) -> TrainState:
  """`state` with the batch norm's statistics recomputed from the current parameters on the
  first `PRECISE_BN_BATCHES` training batches ("precise BN", Wu & Johnson 2021). The
  running averages lag the parameters: at the peak learning rate a step moves the pooled
  head's features by more than their spread across samples, and evaluating with the lagging
  statistics scored several times worse than the mean predictor mid-run."""
  if c.batch_stats_step is None:
    return state
  n = max(1, min(PRECISE_BN_BATCHES, len(source) // batch_size))
  per_batch = [c.batch_stats_step(state.params, state.model_state,
                                  source.batch(np.arange(k * batch_size, (k + 1) * batch_size)))
               for k in range(n)]
  return state.replace(model_state=pool_batch_stats(per_batch))


def abstract_batch(config, batch_sharding: dict) -> dict:
  sample = data.sample_batch(config, config.train.batch_size)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding[k])
          for k, v in sample.items()}


def run(config, workdir: str, *, datasets=None, hooks=()) -> TrainState:
  """Train CosmoFlow as `config` says, in `workdir` (resuming if it holds checkpoints)."""
  plan = validate(config, jax.device_count())
  loop.check_workdir(workdir)
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{plan.spatial_layers} conv/pool layers depth-split", flush=True)
  c = build(config, plan, mesh)
  done = loop.finished(workdir, config, c.abstract_state)
  if done is not None:  # nothing to train: no data to make either
    return done
  train_source, val_source = data.make_sources(config, c.batch_sharding, datasets)
  batch_size = config.train.batch_size
  baseline = baseline_metrics(host_labels(train_source), host_labels(val_source), batch_size)
  sampler = EpochSampler(len(train_source), batch_size, config.seed)
  # Sorted: cheaper gathers and reads, the same set of samples.
  if config.data.get("augment", False):  # a random symmetry of the cube per sample
    read = lambda step: train_source.batch(np.sort(sampler.indices(step)), augment.draw(
        config.seed, step, batch_size))
  else:
    read = lambda step: train_source.batch(np.sort(sampler.indices(step)))
  get_batch = loader.Prefetcher(read, depth=config.data.prefetch)
  try:
    state = loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                     abstract_state=c.abstract_state, train_step=c.train_step,
                     get_batch=get_batch, schedule=c.schedule, phase_of=c.phase_of,
                     evaluate=lambda s: {**evaluate(
                         c.eval_step, precise_batch_stats(c, s, train_source, batch_size),
                         val_source, batch_size), **baseline},
                     hooks=hooks)
  finally:
    get_batch.close()
  print(f"input pipeline ({config.data.source}): the loop waited {get_batch.wait_seconds:.2f} s "
        f"for {get_batch.batches} batches", flush=True)
  return state
