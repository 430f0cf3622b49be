"""The 3D U-Net trainer, top to bottom: validate, mesh, synthetic volumes, model, step,
loop, Dice on held-out volumes, a PNG of slices.

Hybrid data x spatial parallelism as in the CosmoFlow trainer: the batch over the mesh
axis the `batch` rule names, each volume's depth (and height) over the `depth` (`height`)
ones, block by block as `model.layouts` says (`sdl.models.unet3d`). BatchNorm statistics
are those of the whole batch and volume; the loss is the voxel-mean softmax cross-entropy,
with optional class weights.
"""
import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdl import console
from sdl.data import loader, memory_store, segmentation, store, volume_io
from sdl.data.sampler import EpochSampler
from sdl.models.conv import LOWERINGS
from sdl.models.unet3d import NORMS, UNet3D, blocks, resolve_layouts
from sdl.optim import make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.parallel.mesh import check_mesh_config, resolve_mesh_shape
from sdl.parallel.sharding import PARAM_SHARDINGS, describe_rule, logical_size, mesh_rules
from sdl.train import export as export_lib
from sdl.train import loop
from sdl.train.segment import sliding_window
from sdl.train.checkpoint import abstract_like
from sdl.train.step import Model, TrainState, init_state, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
VOLUME, LABELS = ("batch", "depth", "height", None, None), ("batch", "depth", "height", None)
VAL_SEED_OFFSET = 1_000_000  # validation volumes come from seeds training never uses
SOURCES = ("generate", "disk", "memory")


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh_shape: tuple[int, ...]
  mesh_axes: tuple[str, ...]
  rules: tuple[tuple[str, str | tuple[str, ...]], ...]
  layouts: tuple[str, ...]


def model_blocks(config):
  return blocks(tuple(tuple(w) for w in config.model.down), tuple(config.model.bottom))


def validate(config, num_devices: int) -> Plan:
  """Every check that can fail before compiling; errors name the field and the fix."""
  m, d, t = config.model, config.data, config.train
  if m.norm not in NORMS:
    raise ConfigError(f"model.norm={m.norm!r}: choose one of {NORMS}")
  if m.compute_dtype not in DTYPES:
    raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}: choose one of {tuple(DTYPES)}")
  if m.conv_lowering not in LOWERINGS:
    raise ConfigError(f"model.conv_lowering={m.conv_lowering!r}: choose one of {LOWERINGS}")
  if m.classes != len(segmentation.CLASS_NAMES):
    raise ConfigError(f"model.classes={m.classes}: the synthetic volumes have "
                      f"{len(segmentation.CLASS_NAMES)} classes {segmentation.CLASS_NAMES}")
  if m.class_weights and len(m.class_weights) != m.classes:
    raise ConfigError(f"model.class_weights has {len(m.class_weights)} entries for "
                      f"model.classes={m.classes}; give one per class or ()")
  if d.source not in SOURCES:
    raise ConfigError(f"data.source={d.source!r}: choose one of {SOURCES}")
  if d.source != "generate" and not d.path:
    raise ConfigError(f"data.source={d.source!r} reads data.path/train and data.path/val; "
                      "set data.path (write them with `python -m experiments.make_dataset "
                      "--config=experiments/configs/unet3d.py:<variant> --out=DIR`)")
  if config.mesh.params not in PARAM_SHARDINGS:
    raise ConfigError(f"mesh.params={config.mesh.params!r}: choose one of {PARAM_SHARDINGS}")
  check_mesh_config(config.mesh.shape, config.mesh.axes, num_devices)
  shape = resolve_mesh_shape(config.mesh.shape, num_devices)
  axes = tuple(config.mesh.axes)
  rules = mesh_rules(config.mesh.rules)
  size_of = lambda logical: logical_size(rules, axes, shape, logical)
  if t.batch_size % size_of("batch"):
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"{describe_rule(dict(rules).get('batch'))} ({size_of('batch')} "
                      "devices)")
  loop.check_train_config(config)
  for name, count in (("train_volumes", d.train_volumes), ("val_volumes", d.val_volumes)):
    if count < t.batch_size:
      raise ConfigError(f"data.{name}={count} is smaller than train.batch_size="
                        f"{t.batch_size}; add volumes")
  layouts = m.layouts if m.layouts == "auto" else tuple(
      v.strip() for v in str(m.layouts).split(","))
  layouts = resolve_layouts(layouts, model_blocks(config), d.crop_size, size_of("depth"),
                            size_of("height"))
  return Plan(shape, axes, rules, layouts)


def build_model(config, layouts=None, partitioner=None) -> UNet3D:
  m = config.model
  return UNet3D(classes=m.classes, down=tuple(tuple(w) for w in m.down),
                bottom=tuple(m.bottom), norm=m.norm, groups=m.groups, layouts=layouts,
                partitioner=partitioner, dtype=DTYPES[m.compute_dtype],
                conv_lowering=m.conv_lowering)


def step_model(module: UNet3D) -> Model:
  state = ("batch_stats",) if module.norm == "batch" else ()
  return Model(module, inputs=lambda batch: (batch["volume"],),
               kwargs=lambda rng, train: {"train": train}, state_collections=state)


def make_loss(class_weights=()):
  """Voxel-mean (class-weighted) softmax cross-entropy and the voxel accuracy."""
  weights = jnp.asarray(class_weights, jnp.float32) if class_weights else None

  def loss_fn(logits, batch):
    labels = batch["label"].astype(jnp.int32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
    if weights is None:
      loss = jnp.mean(nll)
    else:
      w = weights[labels]
      loss = jnp.sum(w * nll) / jnp.sum(w)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, {"accuracy": accuracy}
  return loss_fn


@dataclasses.dataclass(frozen=True)
class Compiled:
  init_state: Callable[[], TrainState]
  train_step: Callable
  predict: Callable  # (params, model_state, volume) -> class per voxel
  schedule: Callable
  abstract_state: TrainState
  batch_sharding: dict


def sample_batch(config, batch_size: int = 1) -> dict:
  size = config.data.crop_size
  return {"volume": np.zeros((batch_size, size, size, size, 1), np.float32),
          "label": np.zeros((batch_size, size, size, size), np.uint8)}


def build(config, plan: Plan, mesh) -> Compiled:
  part = Partitioner.create(mesh, dict(plan.rules), config.mesh.params)
  module = build_model(config, plan.layouts, part)
  model = step_model(module)
  optimizer = make_optimizer(config.optim, config.train.steps)
  sample = sample_batch(config)
  init = lambda: init_state(model, optimizer.tx, sample, config.seed)
  state_shape = jax.eval_shape(init)
  state_sharding = part.state_shardings(state_shape)
  batch_sharding = {"volume": part.sharding(VOLUME), "label": part.sharding(LABELS)}
  step = make_train_step(model, make_loss(tuple(config.model.class_weights)), optimizer.tx,
                         skip_nonfinite=config.train.skip_nonfinite)
  train_step = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, part.replicated()), donate_argnums=0,
                       static_argnums=2)

  def predict(params, model_state, volume):
    logits = module.apply({"params": params, **model_state}, volume, train=False)
    return jnp.argmax(logits, -1).astype(jnp.uint8)
  predict = jax.jit(predict, in_shardings=(state_sharding.params, state_sharding.model_state,
                                           batch_sharding["volume"]),
                    out_shardings=batch_sharding["label"])
  return Compiled(jax.jit(init, out_shardings=state_sharding), train_step, predict,
                  optimizer.schedule, abstract_like(state_shape, state_sharding),
                  batch_sharding)


def split_seeds(config, split: str) -> tuple[list[int], segmentation.Spec]:
  """The generator's seeds of `split` ("train" or "val") and its volume spec."""
  d = config.data
  count, offset = ((d.train_volumes, 0) if split == "train"
                   else (d.val_volumes, VAL_SEED_OFFSET))
  seeds = [config.seed * 7919 + offset + i for i in range(count)]
  return seeds, segmentation.Spec(d.crop_size, d.balls, d.rods, d.radius)


def volumes(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The generated volumes of `split`: float32 `[n, S, S, S, 1]`, uint8 `[n, S, S, S]`."""
  return segmentation.dataset(*split_seeds(config, split))


def write_datasets(config, out: str, *, overwrite: bool = False, checksum: bool = True):
  """What `data.source="generate"` makes, as the datasets `out/train` and `out/val`
  (`sdl.data.store`: float32 volumes, a uint8 class per voxel), volume by volume."""
  paths = []
  for split in ("train", "val"):
    seeds, spec = split_seeds(config, split)
    s = spec.size
    path = os.path.join(out, split)
    with store.Writer(path, len(seeds), (s, s, s, 1), dtype=np.float32, label_shape=(s, s, s),
                      label_dtype=np.uint8, class_names=segmentation.CLASS_NAMES,
                      source={"generator": "sdl.data.segmentation", "seeds": seeds,
                              "spec": dataclasses.asdict(spec)},
                      checksum=checksum, overwrite=overwrite) as writer:
      for i, seed in enumerate(seeds):
        writer.write(i, *segmentation.volume(seed, spec))
        console.progress(f"writing {path}: {i + 1}/{len(seeds)} volumes",
                         final=i + 1 == len(seeds))
      paths.append(writer.commit())
  return paths


def open_datasets(config) -> tuple[store.Dataset, store.Dataset]:
  """`data.path`'s `train/` and `val/` datasets, checked against the config."""
  s = config.data.crop_size
  datasets = tuple(store.open_dataset(os.path.join(config.data.path, split))
                   for split in ("train", "val"))
  for ds in datasets:
    m = ds.manifest
    if m.volume_shape != (s, s, s, 1) or m.label_shape != (s, s, s):
      raise ConfigError(f"{ds.path} holds volumes {list(m.volume_shape)} and labels "
                        f"{list(m.label_shape)}, but data.crop_size={s} needs {[s] * 3 + [1]} "
                        f"and {[s] * 3}; set data.crop_size={m.volume_shape[0]} or write "
                        "a dataset of that size")
    if m.class_names != segmentation.CLASS_NAMES:
      raise ConfigError(f"{ds.path}: classes {list(m.class_names)}, the model is built for "
                        f"{list(segmentation.CLASS_NAMES)}; write the dataset with "
                        "`python -m experiments.make_dataset`")
  return datasets


def make_sources(config, batch_sharding: dict):
  """Training and validation batch sources (`sdl.data.source.BatchSource`) for
  `data.source`: generated in memory, read from disk by shard, or the training set held
  in the devices' memory (`sdl.data.memory_store`)."""
  if config.data.source == "generate":
    (train_x, train_y), (val_x, val_y) = volumes(config, "train"), volumes(config, "val")
    return (loader.ArraySource({"volume": train_x, "label": train_y}, batch_sharding),
            loader.ArraySource({"volume": val_x, "label": val_y}, batch_sharding))
  train, val = open_datasets(config)
  if config.data.source == "memory":
    return (memory_store.DistributedStore.load(train, batch_sharding),
            loader.ShardedReader(val, batch_sharding))
  return loader.ShardedReader(train, batch_sharding), loader.ShardedReader(val, batch_sharding)


def evaluate(c: Compiled, state, source, batch_size: int, classes: int) -> dict:
  """Dice per class over every held-out voxel (whole full batches), and their means."""
  counts = np.zeros((3, classes))
  for b in range(len(source) // batch_size):
    batch = source.batch(np.arange(b * batch_size, (b + 1) * batch_size))
    pred = c.predict(state.params, state.model_state, batch["volume"])
    counts += segmentation.overlap_counts(pred, batch["label"], classes)
  dice = segmentation.dice_of(counts)
  out = {f"dice_{name}": float(v) for name, v in zip(segmentation.CLASS_NAMES, dice)}
  out.update(dice_mean=float(dice.mean()), dice_foreground=float(dice[1:].mean()))
  return out


def run(config, workdir: str, *, hooks=()) -> TrainState:
  """Train as `config` says, in `workdir` (resuming if it holds checkpoints)."""
  plan = validate(config, jax.device_count())
  loop.check_workdir(workdir)
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
        f"devices; block layouts {dict(zip([b.name for b in model_blocks(config)], plan.layouts))}",
        flush=True)
  c = build(config, plan, mesh)
  done = loop.finished(workdir, config, c.abstract_state)
  if done is not None:
    return done
  train, val = make_sources(config, c.batch_sharding)
  batch_size = config.train.batch_size
  sampler = EpochSampler(len(train), batch_size, config.seed)
  state = loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                   abstract_state=c.abstract_state, train_step=c.train_step,
                   get_batch=lambda step: train.batch(np.sort(sampler.indices(step))),
                   schedule=c.schedule,
                   evaluate=lambda s: evaluate(c, s, val, batch_size, config.model.classes),
                   hooks=hooks)
  if jax.process_index() == 0:
    batch = val.batch(np.arange(batch_size))
    pred = np.asarray(c.predict(state.params, state.model_state, batch["volume"]))
    plot_slices(np.asarray(batch["volume"])[0, ..., 0], np.asarray(batch["label"])[0], pred[0],
                os.path.join(workdir, "slices.png"))
  return state


def plot_slices(volume: np.ndarray, truth: np.ndarray | None, pred: np.ndarray,
                path: str) -> str:
  """A PNG of three orthogonal middle slices: input, truth (where known), prediction."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  cut = lambda a, axis: np.take(a, a.shape[axis] // 2, axis=axis)
  panels = [("input", volume, "gray"), ("truth", truth, "viridis"),
            ("prediction", pred, "viridis")]
  panels = [p for p in panels if p[1] is not None]
  fig, axes = plt.subplots(3, len(panels), figsize=(3 * len(panels), 9), squeeze=False)
  for row, axis in enumerate(range(3)):
    for col, (title, image, cmap) in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(cut(image, axis), cmap=cmap, vmin=None if col == 0 else 0,
                vmax=None if col == 0 else len(segmentation.CLASS_NAMES) - 1)
      ax.set_xticks([]), ax.set_yticks([])
      if row == 0:
        ax.set_title(title)
    axes[row, 0].set_ylabel("DHW"[axis] + " = middle")
  fig.suptitle("classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(segmentation.CLASS_NAMES)))
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


# --- a trained model as two small files, for `experiments.segment` ---------------------

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
SHIPPED = os.path.join(MODELS, "unet3d")  # the demo's model (README, docs/benchmarks.md)


def export(workdir: str, out: str) -> str:
  """The latest checkpoint in `workdir` as `out/params.npz` (parameters and BatchNorm
  statistics, float16) and `out/model.json` (the model config, crop size and step)."""
  def abstract_state(config):  # on one device: orbax reshards whatever mesh saved it
    model = step_model(build_model(config))
    optimizer = make_optimizer(config.optim, config.train.steps)
    shape = jax.eval_shape(lambda: init_state(model, optimizer.tx, sample_batch(config),
                                              config.seed))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract_like(shape, jax.tree.map(lambda _: one, shape))
  config, state = export_lib.latest_state(workdir, abstract_state)
  spec = {"model": config.model.to_dict(), "crop_size": config.data.crop_size,
          "classes": list(segmentation.CLASS_NAMES), "step": int(state.step)}
  return export_lib.write(out, {"params": state.params, **state.model_state}, spec,
                          np.float16)


def read_exported(directory: str):
  """(variables: params and BatchNorm statistics, spec) of a model written by `export`."""
  return export_lib.read(directory, "a 3D U-Net model", "experiments.segment --export")


def load_exported(directory: str):
  """(predict, spec) of a model written by `export`: `predict(volume [n, S, S, S, 1])` is
  the softmax of the logits, `[n, S, S, S, classes]`, jitted for one device."""
  from ml_collections import ConfigDict  # noqa: PLC0415

  variables, spec = read_exported(directory)
  module = build_model(ConfigDict({"model": spec["model"]}))
  predict = jax.jit(lambda v: jax.nn.softmax(module.apply(variables, v, train=False), -1))
  return predict, spec


def segment_file(model_dir: str, volume_path: str, out: str, *, window: int | None = None,
                 overlap: float = 0.5, batch: int = 2, standardize: bool = True,
                 log=print):
  """Segment `volume_path` with the model in `model_dir` into `out` (and `<out>.png`);
  returns (classes `[D, H, W]` uint8, the model's spec)."""
  predict, spec = load_exported(model_dir)
  levels = len(spec["model"]["down"])
  window = window or spec["crop_size"]
  if window < 2 ** levels or window % 2 ** levels:
    raise ConfigError(f"--window={window}: must be a positive multiple of 2^levels = "
                      f"{2 ** levels} (the network pools {levels} times)")
  if not 0 <= overlap < 1:
    raise ConfigError(f"--overlap={overlap}: must be in [0, 1)")
  if batch < 1:
    raise ConfigError(f"--batch={batch}: must be at least 1")
  if not out.endswith(volume_io.SUFFIXES):
    raise ConfigError(f"--out={out}: must end in .npy or .zarr")
  volume = volume_io.read_volume(volume_path)
  if standardize:
    volume = (volume - volume.mean()) / max(float(volume.std()), 1e-12)
  stride = max(1, int(round(window * (1 - overlap))))
  started = time.perf_counter()

  def progress(done, total):  # about ten lines in a log; a terminal redraws one line
    if done == total or done % max(1, total // 10) == 0:
      console.progress(f"segmenting: {done}/{total} network calls of {batch} windows "
                       f"({time.perf_counter() - started:.0f} s)", final=done == total)
  probs = sliding_window(volume, predict, window, stride, batch, progress=progress)
  classes = np.argmax(probs, -1).astype(np.uint8)
  volume_io.write_labels(out, classes)
  took = time.perf_counter() - started
  names = spec.get("classes") or [str(i) for i in range(probs.shape[-1])]
  fractions = np.bincount(classes.ravel(), minlength=len(names)) / classes.size
  log(f"{list(volume.shape[:3])} voxels in {took:.1f} s (window {window}, stride {stride}) "
      f"-> {out}; " + ", ".join(f"{n} {f:.1%}" for n, f in zip(names, fractions)))
  png = os.path.splitext(out)[0] + ".png"
  plot_slices(volume[..., 0], None, classes, png)
  log(f"slices: {png}")
  return classes, spec
