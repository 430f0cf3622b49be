"""K-FAC against SGD-momentum and Adam: the same problem, each optimiser's lr sweep, one run.

Setup (`make_problem`): model, loss on the model's outputs, the likelihood K-FAC samples
its Fisher from, the training arrays and a fixed evaluation batch. Each run (`train_one`)
times every step after the first (compilation is reported apart, evaluation is not
counted) and records the training-set loss every `train.eval_every` steps. `compare`
runs the sweep, keeps each finished run as JSON (a restarted command skips it), and
writes the summary table and the loss-vs-steps / loss-vs-seconds plots.
"""
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdl.data.sampler import EpochSampler
from sdl.optim import kfac
from sdl.train.losses import sigmoid_xent, softmax_xent
from sdl.train.metrics import Progress
from sdl.train.step import Model, TrainState, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Problem:
  model: object
  loss_fn: Callable          # (outputs, batch) -> (scalar loss, metrics), a batch mean
  likelihood: str            # what K-FAC samples its Fisher from
  batch: Callable            # step -> {"x": ..., "y": ...} numpy, the same for every run
  eval_batch: dict           # a fixed batch on which the reported loss is measured
  model_kwargs: Callable = lambda rng: {}

  @property
  def example(self):
    """One input example, `[1, ...]`, for shapes."""
    return jnp.asarray(self.eval_batch["x"][:1])


def array_batches(train: dict, batch_size: int, seed: int) -> Callable[[int], dict]:
  sampler = EpochSampler(len(train["x"]), batch_size, seed)
  return lambda step: {k: v[sampler.indices(step)] for k, v in train.items()}


def make_problem(config) -> Problem:
  name = config.experiment
  if name.startswith("digits"):
    from sdl.data import digits
    from sdl.models.small import Autoencoder, DigitsCNN
    x, y, _, _ = digits.load(config.seed)
    train = {"x": x, "y": y}
    batches = array_batches(train, config.train.batch_size, config.seed)
    if name == "digits_autoencoder":
      return Problem(Autoencoder(), sigmoid_xent, "bernoulli", batches, train)
    return Problem(DigitsCNN(), softmax_xent, "categorical", batches, train)
  if name == "cosmoflow":
    from experiments.trainers.cosmoflow import dropout_of
    from sdl.data.cosmoflow import make_datasets
    from sdl.models.cosmoflow import CosmoFlow
    train_set, _ = make_datasets(config)
    model = CosmoFlow(variant=config.model.variant, input_size=config.data.input_size,
                      spatial_layers=0, conv_lowering=config.model.conv_lowering,
                      dropout=dropout_of(config))

    def mse(outputs, batch):
      return jnp.mean(jnp.square(outputs - batch["y"])), {}
    train = {"x": train_set.volumes, "y": train_set.labels}
    n_eval = min(32, len(train_set.labels))
    return Problem(model, mse, "gaussian",
                   array_batches(train, config.train.batch_size, config.seed),
                   {k: v[:n_eval] for k, v in train.items()},
                   model_kwargs=lambda rng: {"train": True, "rngs": {"dropout": rng}})
  if name == "resnet50_imagenet":
    from sdl.data.image_folder import ImageFolder
    from sdl.models.resnet import ResNet
    if not config.data.path:
      raise ValueError("resnet50_imagenet reads an ImageNet-style folder: set "
                       "--config.data.path=DIR (DIR/train/<class>/*.jpg)")
    folder = ImageFolder.scan(os.path.join(config.data.path, "train"))
    size = config.data.image_size
    sampler = EpochSampler(len(folder), config.train.batch_size, config.seed)
    model = ResNet(tuple(config.model.stage_sizes), config.model.width, len(folder.classes))
    eval_batch = folder.read(np.arange(min(len(folder), config.data.eval_images)), size)
    # Batches are decoded between the timed steps (`train_one`), so no read-ahead is needed.
    return Problem(model, softmax_xent, "categorical",
                   lambda step: folder.read(sampler.indices(step), size), eval_batch)
  raise ValueError(f"unknown experiment {name!r}")


def make_tx(name: str, lr: float, config, layers):
  if name == "sgd":
    return optax.sgd(lr, momentum=config.momentum)
  if name == "adam":
    return optax.adam(lr)
  if name == "kfac":
    k = config.kfac
    if k.adaptive and k.momentum:  # (kfac() itself rejects adaptive with a KL clip)
      raise ValueError("kfac.adaptive=True chooses the momentum itself: set kfac.momentum=0 "
                       "(the lr stays a multiplier of the step)")
    pre = kfac.kfac(layers, damping=k.damping, pi_damping=k.pi_damping,
                    relative_damping=k.relative_damping,
                    factor_decay=k.factor_decay, stats_every=k.stats_every,
                    inverse_every=k.inverse_every, inversion=k.inversion,
                    stale_tolerance=k.stale_tolerance, factor_dtype=DTYPES[k.factor_dtype],
                    comm_dtype=DTYPES[k.comm_dtype], fallback=k.fallback, kl_clip=k.kl_clip,
                    learning_rate=lr, norm_clip=k.norm_clip, max_factor_dim=k.max_factor_dim,
                    wide_conv=k.wide_conv, adaptive=k.adaptive,
                    kl_clip_per_layer=k.kl_clip_per_layer, grad_factors=k.grad_factors)
    return optax.chain(pre, optax.sgd(lr, momentum=k.momentum))
  raise ValueError(f"optimiser {name!r}: choose kfac, sgd or adam")


def make_step(problem: Problem, name: str, tx, layers, fisher: str):
  """The project's one train step, with K-FAC's gradients function for "kfac"."""
  model = Model(problem.model, inputs=lambda batch: (batch["x"],),
                kwargs=lambda rng, train: problem.model_kwargs(rng))
  if name == "kfac":
    from sdl.kernels import conv3d as direct_kernels  # the kernel workaround: the caller's
    grads = kfac.gradients(layers, fisher=fisher, likelihood=problem.likelihood,
                           transposable=direct_kernels.disabled)
    return make_train_step(model, problem.loss_fn, tx, gradients=grads)
  return make_train_step(model, problem.loss_fn, tx)


class JitStep:
  """The jitted, state-donating step as `run(state, batch, i)` for update number `i`.

  K-FAC's is compiled once per phase (`kfac.Phase`): its plain steps run the untagged model
  and carry no statistics or inversion branches. `compile(state, batch)` compiles every
  phase ahead of time (it returns the seconds spent), so that no later step of a timed run
  pays for a compilation: with lazy compilation the first plain and the first
  statistics-only step each took 2-3 s on the digits autoencoder, whose 300 steps take
  about 3.5 s.
  """

  def __init__(self, fn, kfac_every: tuple[int, int] | None):
    self.kfac_every = kfac_every
    self.jitted = jax.jit(fn, donate_argnums=0,
                          **({"static_argnames": "phase"} if kfac_every else {}))
    self.compiled = {}

  def phase(self, i: int):
    return kfac.phase_at(i, *self.kfac_every) if self.kfac_every else None

  def phases(self) -> list:
    if not self.kfac_every:
      return [None]
    return sorted({self.phase(i) for i in range(math.lcm(*self.kfac_every))})

  def executable(self, phase, state, batch):
    """The compiled step for `phase`, compiled on first use."""
    if phase not in self.compiled:
      kw = {} if phase is None else {"phase": phase}
      self.compiled[phase] = self.jitted.lower(state, batch, **kw).compile()
    return self.compiled[phase]

  def compile(self, state, batch) -> float:
    t0 = time.perf_counter()
    for phase in self.phases():
      self.executable(phase, state, batch)
    return time.perf_counter() - t0

  def __call__(self, state, batch, i: int):
    return self.executable(self.phase(i), state, batch)(state, batch)


def jit_step(problem: Problem, name: str, tx, layers, config) -> JitStep:
  """`JitStep` for optimiser `name` on `problem`."""
  fn = make_step(problem, name, tx, layers, config.kfac.fisher)
  k = config.kfac
  return JitStep(fn, (k.stats_every, k.inverse_every) if name == "kfac" else None)


def train_one(config, problem: Problem, name: str, lr: float, *, progress=True) -> dict:
  """One optimiser at one learning rate; returns its history and step times."""
  x0 = problem.example
  layers = kfac.select_layers(kfac.find_layers(problem.model, x0),
                             config.kfac.max_factor_dim, config.kfac.wide_conv)
  params = problem.model.init(jax.random.key(config.seed), x0)["params"]
  tx = make_tx(name, lr, config, layers)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(config.seed + 1)))
  step = jit_step(problem, name, tx, layers, config)

  @jax.jit
  def loss_on(params, batch):  # the batch is an argument: a closed-over one is constant-folded
    return problem.loss_fn(problem.model.apply({"params": params}, batch["x"]), batch)[0]

  eval_batch = {k: jnp.asarray(v) for k, v in problem.eval_batch.items()}
  evaluate = lambda params: loss_on(params, eval_batch)

  steps = config.train.steps
  history, seconds, step_times = [], 0.0, []
  history.append({"step": 0, "seconds": 0.0, "loss": float(evaluate(state.params))})
  batch = {k: jnp.asarray(v) for k, v in problem.batch(0).items()}
  compile_s = step.compile(state, batch)  # every phase: reported apart, not in the time axis
  bar = Progress(steps, 0) if progress else None
  for i in range(steps):
    batch = {k: jnp.asarray(v) for k, v in problem.batch(i).items()}
    t0 = time.perf_counter()
    state, metrics = step(state, batch, i)
    jax.block_until_ready(metrics["loss"])
    dt = time.perf_counter() - t0
    seconds += dt
    step_times.append(dt)
    if (i + 1) % config.train.eval_every == 0 or i + 1 == steps:
      loss = float(evaluate(state.params))
      history.append({"step": i + 1, "seconds": seconds, "loss": loss})
      if not math.isfinite(loss):
        break  # a diverged run: recorded as such, the sweep goes on
      if bar:
        bar.line(i + 1, (i + 1) / max(seconds + compile_s, 1e-9), {"loss": loss})
  return {"optimizer": name, "lr": lr, "history": history, "compile_s": compile_s,
          "step_s_median": float(np.median(step_times)) if step_times else float("nan")}


def reached(run: dict, target: float) -> tuple[float, float]:
  """(steps, seconds) at the first evaluation with loss ≤ target, or (inf, inf)."""
  for h in run["history"]:
    if h["loss"] <= target:
      return h["step"], h["seconds"]
  return math.inf, math.inf


def best(runs: list[dict], target: float) -> dict | None:
  def key(r):
    final = r["history"][-1]["loss"]
    return (reached(r, target)[0], final if math.isfinite(final) else math.inf)
  return min(runs, key=key) if runs else None


def compare(config, workdir: str) -> dict:
  problem = make_problem(config)
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  runs = []
  for name in config.optimizers:
    for lr in config.sweep[name]:
      path = os.path.join(workdir, "runs", f"{name}_lr{lr:g}.json")
      if os.path.exists(path):
        with open(path) as f:
          runs.append(json.load(f))
        print(f"{name} lr={lr:g}: done earlier ({path})", flush=True)
        continue
      print(f"{name} lr={lr:g}:", flush=True)
      run = train_one(config, problem, name, lr)
      with open(path + ".tmp", "w") as f:
        json.dump(run, f)
      os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a run
      runs.append(run)
  summary = summarize(config, runs)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(summary["table"])
  plot(runs, summary, workdir)
  print(summary["table"], flush=True)
  return summary


def summarize(config, runs: list[dict]) -> dict:
  target = config.train.target_loss
  rows, chosen = [], {}
  for name in config.optimizers:
    b = best([r for r in runs if r["optimizer"] == name], target)
    if b is None:
      continue
    chosen[name] = b
    steps, secs = reached(b, target)
    rows.append(f"| {name} | {b['lr']:g} | {steps:g} | {secs:.2f} | "
                f"{b['history'][-1]['loss']:.4f} | {b['step_s_median'] * 1e3:.1f} | "
                f"{b['compile_s']:.1f} |")
  out = {"target_loss": target, "best": {n: {"lr": b["lr"], "steps": reached(b, target)[0],
                                              "seconds": reached(b, target)[1],
                                              "final_loss": b["history"][-1]["loss"],
                                              "step_s_median": b["step_s_median"]}
                                          for n, b in chosen.items()}}
  first_order = [chosen[n] for n in ("sgd", "adam") if n in chosen]
  if "kfac" in chosen and first_order:
    k_steps, k_secs = reached(chosen["kfac"], target)
    base_steps = min(reached(r, target)[0] for r in first_order)
    base_secs = min(reached(r, target)[1] for r in first_order)
    sgd = chosen.get("sgd")
    out["kfac_vs_best_first_order"] = {
        "steps_ratio": _ratio(k_steps, base_steps),
        "seconds_ratio": _ratio(k_secs, base_secs),
        "step_time_vs_sgd": (chosen["kfac"]["step_s_median"] / sgd["step_s_median"]
                             if sgd else None)}
  ratios = out.get("kfac_vs_best_first_order", {})
  fmt = lambda v: "n/a (not reached)" if v is None or not math.isfinite(v) else f"{v:.2f}"
  out["table"] = (
      f"Target loss {target} ({config.experiment}, {config.train.steps} steps, batch "
      f"{config.train.batch_size}); best learning rate of each sweep.\n\n"
      "| optimiser | lr | steps to target | seconds to target | final loss | "
      "median step (ms) | compile (s) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
      + "\n\nK-FAC / best of SGD and Adam: steps " + fmt(ratios.get("steps_ratio"))
      + ", seconds " + fmt(ratios.get("seconds_ratio")) + "; K-FAC step time / SGD step time "
      + fmt(ratios.get("step_time_vs_sgd")) + "\n")
  initial = min((b["history"][0]["loss"] for b in chosen.values()), default=math.inf)
  if initial <= target:
    out["table"] += (f"\nThe target is met before training (initial loss {initial:.4f} ≤ "
                     f"{target}): set train.target_loss below it to compare optimisers.\n")
  return out


def _ratio(kfac_value: float, first_order: float) -> float | None:
  """K-FAC's steps (or seconds) over the best first-order run's; None when undefined."""
  if not math.isfinite(first_order) or first_order <= 0:
    return None
  return kfac_value / first_order


def loss_figure(runs: list[dict], summary: dict, axis: str = "step"):
  """Loss of every run against `axis` ("step" or "seconds", compilation excluded), each
  optimiser's best learning rate drawn bold: a plain matplotlib `Figure`."""
  from matplotlib.figure import Figure  # noqa: PLC0415
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for r in runs:
    chosen = summary["best"].get(r["optimizer"], {}).get("lr") == r["lr"]
    xs = [h[axis] for h in r["history"]]
    ys = [h["loss"] for h in r["history"]]
    ax.plot(xs, ys, lw=2 if chosen else 0.7, alpha=1 if chosen else 0.4,
            label=f"{r['optimizer']} lr={r['lr']:g}" + (" (best)" if chosen else ""))
  ax.axhline(summary["target_loss"], color="k", ls=":", lw=0.8)
  ax.set_xlabel("steps" if axis == "step" else "seconds (compilation excluded)")
  ax.set_ylabel("training loss")
  ax.set_yscale("log")
  ax.legend(fontsize=6)
  fig.tight_layout()
  return fig


def plot(runs: list[dict], summary: dict, workdir: str) -> None:
  for axis, name in (("step", "steps"), ("seconds", "seconds")):
    loss_figure(runs, summary, axis).savefig(os.path.join(workdir, f"loss_vs_{name}.png"),
                                             dpi=120)