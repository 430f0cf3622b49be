"""The digits trainer, top to bottom: any sdl optimiser (SGD, Adam, K-FAC) through the
generic loop, on the 8x8 digits scikit-learn ships.

The same `sdl.train` pieces as CosmoFlow's trainer: a plan from the config, a data-parallel
mesh, the state created in its shardings, the one train step (K-FAC's gradients function
and phases when `optim.name="kfac"`), the generic evaluation on the held-out digits, and
`loop.fit` with checkpoints, metrics and plots. Models: the K-FAC papers' autoencoder
(sigmoid cross-entropy on the pixels), a small CNN and a BatchNorm MLP (cross-entropy).
"""
import dataclasses
import math
from collections.abc import Callable

import jax

from sdl.data import digits
from sdl.data.loader import ArraySource
from sdl.data.sampler import EpochSampler
from sdl.models.small import Autoencoder, DigitsBatchNormMLP, DigitsCNN
from sdl.optim import make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.parallel.mesh import check_mesh_config, resolve_mesh_shape
from sdl.train import loop
from sdl.train.checkpoint import abstract_like
from sdl.train.evaluate import evaluate
from sdl.train.losses import sigmoid_xent, softmax_xent
from sdl.train.step import Model, TrainState, init_state, make_eval_step, make_train_step

# model name: (module, loss, K-FAC's likelihood, state collections, takes `train=`)
MODELS = {
    "autoencoder": (Autoencoder, sigmoid_xent, "bernoulli", (), False),
    "cnn": (DigitsCNN, softmax_xent, "categorical", (), False),
    "batchnorm_mlp": (DigitsBatchNormMLP, softmax_xent, "categorical", ("batch_stats",), True),
}


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh_shape: tuple[int, ...]
  devices: int


def validate(config, num_devices: int) -> Plan:
  loop.check_train_config(config)
  if config.model.name not in MODELS:
    raise ConfigError(f"model.name={config.model.name!r}: choose one of {tuple(MODELS)}")
  shape = tuple(config.mesh.shape)
  # A mesh of fixed size runs on the first devices (a 1-device run on an 8-device host).
  devices = math.prod(shape) if -1 not in shape else num_devices
  if devices > num_devices:
    raise ConfigError(f"mesh.shape {shape} needs {devices} devices but {num_devices} are "
                      "available; on CPU set mesh.cpu_devices")
  check_mesh_config(shape, config.mesh.axes, devices)
  shape = resolve_mesh_shape(shape, devices)
  data = dict(zip(config.mesh.axes, shape)).get(dict(config.mesh.rules).get("batch"), 1)
  for field in ("train", "eval"):
    batch = config[field].batch_size
    if batch % data:
      raise ConfigError(f"{field}.batch_size={batch} is not divisible by the {data} "
                        f"data-parallel devices; use a multiple of {data}")
  return Plan(shape, devices)


@dataclasses.dataclass(frozen=True)
class Compiled:
  init_state: Callable[[], TrainState]
  train_step: Callable
  eval_step: Callable
  schedule: Callable
  phase_of: Callable | None
  abstract_state: TrainState
  batch_sharding: dict


def build(config, mesh, example: dict) -> Compiled:
  part = Partitioner.create(mesh, dict(config.mesh.rules), config.mesh.params)
  module_cls, loss_fn, likelihood, collections, takes_train = MODELS[config.model.name]
  module = module_cls()
  kwargs = (lambda rng, train: {"train": train}) if takes_train else (lambda rng, train: {})
  model = Model(module, inputs=lambda batch: (batch["x"],), kwargs=kwargs,
                state_collections=collections)
  optim = config.optim
  if optim.name == "kfac":
    optim = optim.copy_and_resolve_references()
    with optim.unlocked():
      optim.kfac.likelihood = likelihood  # what K-FAC samples its Fisher from
  optimizer = make_optimizer(optim, config.train.steps, model=module, example=(example["x"],))
  init = lambda: init_state(model, optimizer.tx, example, config.seed)
  state_shape = jax.eval_shape(init)
  state_sharding = part.state_shardings(state_shape)
  batch_sharding = {"x": part.sharding(("batch", None, None, None)),
                    "y": part.sharding(("batch",))}
  step = make_train_step(model, loss_fn, optimizer.tx, gradients=optimizer.gradients,
                         skip_nonfinite=config.train.skip_nonfinite)
  train_step = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, part.replicated()), donate_argnums=0,
                       static_argnums=2)  # the phase
  eval_step = jax.jit(make_eval_step(model, loss_fn),
                      in_shardings=(state_sharding.params, state_sharding.model_state,
                                    batch_sharding), out_shardings=part.replicated())
  return Compiled(jax.jit(init, out_shardings=state_sharding), train_step, eval_step,
                  optimizer.schedule, optimizer.phase_of,
                  abstract_like(state_shape, state_sharding), batch_sharding)


def run(config, workdir: str, *, hooks=()) -> TrainState:
  """Train as `config` says, in `workdir` (resuming if it holds checkpoints)."""
  plan = validate(config, jax.device_count())
  loop.check_workdir(workdir)
  mesh = make_mesh(plan.mesh_shape, config.mesh.axes, devices=jax.devices()[:plan.devices])
  x, y, test_x, test_y = digits.load(config.seed)
  c = build(config, mesh, {"x": x[:1], "y": y[:1]})
  done = loop.finished(workdir, config, c.abstract_state)
  if done is not None:
    return done
  train = ArraySource({"x": x, "y": y}, c.batch_sharding)
  test = ArraySource({"x": test_x, "y": test_y}, c.batch_sharding)
  sampler = EpochSampler(len(train), config.train.batch_size, config.seed)
  print(f"digits {config.model.name} with {config.optim.name} on mesh {dict(mesh.shape)}",
        flush=True)
  return loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                  abstract_state=c.abstract_state, train_step=c.train_step,
                  get_batch=lambda step: train.batch(sampler.indices(step)),
                  evaluate=lambda s: evaluate(c.eval_step, s, test, config.eval.batch_size),
                  schedule=c.schedule, phase_of=c.phase_of, hooks=hooks)
