"""Where a K-FAC step's time goes, and how inversion cost grows with layer width.

Each part of the step is compiled and timed on its own (`sdl.bench.timing.measure`: warm-up
outside the timing, `block_until_ready`, median of the runs):

  forward/backward     the plain gradient (what SGD pays, and K-FAC on steps without
                       statistics), and the tagged one K-FAC runs on statistics steps
                       (layer inputs sown, output gradients from the perturbations)
  fisher backward      the extra backward pass of the sampled Fisher
  statistics           the factor sums Σ a aᵀ, Σ g gᵀ of every layer
  inversion            every layer's damped inverses
  preconditioning      A⁻¹ ∇W G⁻¹ for every layer (from the batch's factors X, Γ where
                       those are cheaper and `kfac.grad_factors` is on, as in the step)
  communication        bytes a data-parallel step all-reduces (gradients every step,
                       factors every `stats_every` steps, fp32 and bf16); the time of that
                       all-reduce is measured on the local devices, which on a CPU host are
                       threads sharing memory, so it stands for nothing on a real network

and the whole steps are timed too (`whole_steps`): SGD's, and K-FAC's averaged over cycles
of `inverse_every` steps (amortised), which the parts should add up to.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.trainers.kfac_compare import Problem, jit_step, make_problem, make_tx
from sdl.bench.timing import measure
from sdl.optim import kfac
from sdl.train.step import TrainState


def _timed(fn, *args, runs):
  return measure(jax.jit(fn), *args, runs=runs).median_s


def step_parts(config, problem: Problem | None = None, runs: int = 10) -> dict:
  """Seconds per part (module docstring) for `config`'s problem and K-FAC settings."""
  problem = problem or make_problem(config)
  k = config.kfac
  n = config.train.batch_size
  batch = {key: jnp.asarray(v) for key, v in problem.batch(0).items()}
  kw = problem.model_kwargs(jax.random.key(1))
  layers = kfac.select_layers(kfac.find_layers(problem.model, batch["x"][:1]),
                             k.max_factor_dim, k.wide_conv)
  params = problem.model.init(jax.random.key(0), batch["x"][:1])["params"]
  model = problem.model

  def plain(params, batch):
    return jax.grad(lambda p: problem.loss_fn(model.apply({"params": p}, batch["x"], **kw),
                                              batch)[0])(params)

  def tagged(params, batch):
    forward = kfac.module_forward(model, batch["x"], **kw)
    eps = kfac.zero_perturbations(forward, layers, params)
    out, pullback, (inputs, _) = jax.vjp(
        lambda p, e: kfac.tagged_forward(forward, layers, p, e), params, eps, has_aux=True)
    d_out = jax.grad(lambda o: problem.loss_fn(o, batch)[0])(out)
    grads, d_layers = pullback(d_out)
    return grads, d_layers, inputs, out, pullback

  def tagged_only(params, batch):
    return tagged(params, batch)[:3]

  def with_fisher(params, batch):
    grads, d_layers, inputs, out, pullback = tagged(params, batch)
    sampled = kfac.sample_output_grads(problem.likelihood, out, jax.random.key(2))
    return grads, d_layers, inputs, pullback(sampled.astype(out.dtype))[1]

  grads, d_layers, inputs = jax.jit(tagged_only)(params, batch)
  out_grads = {name: g * n for name, g in kfac.by_layer(d_layers).items()}

  def statistics(inputs, out_grads):
    return {name: kfac.layer_factors(spec, inputs[name], out_grads[name])
            for name, spec in layers.items()}

  factors = {name: (sa / nt, sg / m)
             for name, (sa, sg, nt, m) in jax.jit(statistics)(inputs, out_grads).items()}

  def inversion(factors):
    out = {}
    for name, (a, g) in factors.items():
      da, dg = kfac.factored_damping(a, g, k.damping, k.pi_damping, k.relative_damping)
      out[name] = (kfac.damped_inverse(a, da, k.inversion),
                   kfac.damped_inverse(g, dg, k.inversion))
    return out

  inverses = jax.jit(inversion)(factors)

  def precondition(inverses, grads, inputs, d_layers):
    flat, out = kfac.flatten_paths(grads), []
    for name, spec in layers.items():
      kernel = flat[(*spec.path, "kernel")]
      bias = flat.get((*spec.path, "bias")) if spec.has_bias else None
      g = d_layers[name]
      if k.grad_factors and kfac.prefers_grad_factors(spec, g.size // g.shape[-1]):
        out.append(kfac.precondition_factored(
            spec, kernel, bias, *kfac.gradient_factors(spec, inputs[name], g),
            *inverses[name]))
      else:
        out.append(kfac.precondition(spec, kernel, bias, *inverses[name]))
    return out

  parts = {
      "forward/backward (plain)": _timed(plain, params, batch, runs=runs),
      "forward/backward (tagged)": _timed(tagged_only, params, batch, runs=runs),
      "forward/backward + fisher backward": _timed(with_fisher, params, batch, runs=runs),
      "statistics": _timed(statistics, inputs, out_grads, runs=runs),
      "inversion": _timed(inversion, factors, runs=max(3, runs // 3)),
      "preconditioning": _timed(precondition, inverses, grads, inputs,
                                kfac.by_layer(d_layers), runs=runs),
  }
  parts["fisher backward"] = max(parts.pop("forward/backward + fisher backward")
                                 - parts["forward/backward (tagged)"], 0.0)
  grad_bytes = sum(x.size for x in jax.tree.leaves(params)) * 4
  factor_bytes = sum(s.in_dim ** 2 + s.out_dim ** 2 for s in layers.values()) * 4
  parts["communication"] = _all_reduce_seconds(grad_bytes // 4, runs)
  return {"parts": parts, "layers": layers, "grad_bytes": grad_bytes,
          "factor_bytes": factor_bytes, "devices": len(jax.devices())}


def _all_reduce_seconds(elements: int, runs: int) -> float:
  devices = jax.devices()
  if len(devices) < 2:
    return 0.0
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  x = jax.device_put(jnp.ones((len(devices), elements), jnp.float32),
                     jax.sharding.NamedSharding(mesh, spec))
  fn = jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=spec,
                     out_specs=spec)
  return measure(jax.jit(fn), x, runs=runs).median_s


def whole_steps(config, problem: Problem | None = None, lr: float = 0.01,
                cycles: int = 7) -> dict:
  """Seconds per step, SGD's and K-FAC's, each a median over `cycles` cycles.

  A cycle is `inverse_every` consecutive steps (so K-FAC's holds exactly one inversion and
  its share of statistics steps: its mean is the amortised step). SGD's and K-FAC's cycles
  alternate, so a slow spell of a shared machine hits both; states are donated, as in
  training. Also returns K-FAC's median step by kind: plain, statistics, inversion.
  """
  problem = problem or make_problem(config)
  k = config.kfac
  x0 = problem.example
  layers = kfac.select_layers(kfac.find_layers(problem.model, x0), k.max_factor_dim,
                              k.wide_conv)
  params = problem.model.init(jax.random.key(0), x0)["params"]
  batch = {key: jnp.asarray(v) for key, v in problem.batch(0).items()}
  runners = {}
  for name in ("sgd", "kfac"):
    tx = make_tx(name, lr, config, layers)
    own = jax.tree.map(jnp.copy, params)  # donated below
    state = TrainState(jnp.zeros((), jnp.int32), own, tx.init(own),
                       jax.random.key_data(jax.random.key(1)))
    step = jit_step(problem, name, tx, layers, config)
    for i in range(k.inverse_every):  # compile, then one untimed cycle
      state, m = step(state, batch, i)
    jax.block_until_ready(m)
    runners[name] = [step, state]
  means = {"sgd": [], "kfac": []}
  kinds = {"plain": [], "statistics": [], "inversion": []}
  for cycle in range(1, cycles + 1):
    for name, runner in runners.items():
      times = []
      for i in range(k.inverse_every):  # the cycle starts on an inversion step
        count = cycle * k.inverse_every + i
        t0 = time.perf_counter()
        runner[1], m = runner[0](runner[1], batch, count)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        if name == "kfac":
          kind = ("inversion" if i == 0 else "statistics" if count % k.stats_every == 0
                  else "plain")
          kinds[kind].append(times[-1])
      means[name].append(float(np.mean(times)))
  out = {name: float(np.median(v)) for name, v in means.items()}
  out["kfac_by_kind"] = {kind: float(np.median(v)) for kind, v in kinds.items() if v}
  out["cycles"] = cycles
  return out


def inversion_scaling(widths=(64, 128, 256, 512, 1024, 2048), runs: int = 3) -> list[dict]:
  """Seconds to invert one damped `d x d` factor, by eigh and by Cholesky."""
  rows = []
  for d in widths:
    a = np.random.default_rng(d).normal(size=(2 * d, d)).astype(np.float32)
    m = jnp.asarray(a.T @ a / (2 * d))
    row = {"width": d}
    for method in kfac.INVERSIONS:
      row[method] = measure(jax.jit(lambda m, method=method: kfac.damped_inverse(m, 1e-3, method)),
                            m, runs=runs).median_s
    rows.append(row)
  return rows


def fit_exponent(widths, seconds) -> float:
  """Slope of log(seconds) against log(width) over the larger half of the widths."""
  half = len(widths) // 2
  return float(np.polyfit(np.log(widths[half:]), np.log(seconds[half:]), 1)[0])


def amortised_shares(config) -> dict[str, float]:
  """How many times per step each part runs, on average over a cycle of steps."""
  k = config.kfac
  # Steps run in phases (`kfac.Phase`): only statistics steps run the tagged model.
  return {"forward/backward (plain)": 1 - 1 / k.stats_every,
          "forward/backward (tagged)": 1 / k.stats_every, "statistics": 1 / k.stats_every,
          "fisher backward": 1 / k.stats_every if k.fisher == "sampled" else 0.0,
          "inversion": 1 / k.inverse_every, "preconditioning": 1.0}


def report(config, parts: dict, steps: dict, scaling: list[dict], out_png: str | None) -> str:
  k = config.kfac
  p = parts["parts"]
  per_step = amortised_shares(config)
  amortised = sum(p[name] * share for name, share in per_step.items())
  lines = [f"### {config.experiment}: batch {config.train.batch_size}, "
           f"{len(parts['layers'])} K-FAC layers, T_stats={k.stats_every}, "
           f"T_inv={k.inverse_every}, {k.inversion}\n",
           "| part | ms per call | ms per step (amortised) |", "|---|---|---|"]
  for name, secs in p.items():
    share = per_step.get(name)
    lines.append(f"| {name} | {secs * 1e3:.2f} | "
                 f"{'' if share is None else f'{secs * share * 1e3:.2f}'} |")
  lines += [
      "",
      f"All-reduced per step: gradients {parts['grad_bytes'] / 2**20:.2f} MiB fp32 "
      f"({parts['grad_bytes'] / 2**21:.2f} MiB bf16); factors "
      f"{parts['factor_bytes'] / 2**20:.2f} MiB fp32 every {k.stats_every} step(s). The "
      f"communication row is that gradient all-reduce over {parts['devices']} local "
      "device(s) (shared memory here: not a network measurement).",
      "",
      f"Sum of parts (amortised, excluding communication): {amortised * 1e3:.1f} ms; measured "
      f"whole steps (median over {steps['cycles']} cycles of {k.inverse_every} steps, SGD's and "
      f"K-FAC's cycles alternating): K-FAC {steps['kfac'] * 1e3:.1f} ms, SGD "
      f"{steps['sgd'] * 1e3:.1f} ms; **K-FAC / SGD = {steps['kfac'] / steps['sgd']:.2f}**. "
      "K-FAC steps by kind (median ms): " + ", ".join(
          f"{kind} {secs * 1e3:.1f}" for kind, secs in steps["kfac_by_kind"].items()) + ".",
      "", "Inversion of one d x d factor (seconds):", "",
      "| d | eigh | cholesky |", "|---|---|---|"]
  lines += [f"| {r['width']} | {r['eigh']:.4f} | {r['cholesky']:.4f} |" for r in scaling]
  widths = [r["width"] for r in scaling]
  for method in kfac.INVERSIONS:
    lines.append(f"\n{method}: time ∝ d^{fit_exponent(widths, [r[method] for r in scaling]):.2f} "
                 "over the larger widths.")
  if out_png:
    breakdown_figure(config, parts, steps, scaling).savefig(out_png, dpi=120)
  return "\n".join(lines) + "\n"


def breakdown_figure(config, parts: dict, steps: dict, scaling: list[dict]):
  """Where an amortised K-FAC step's time goes (against SGD's step), and inversion time
  against factor width: a plain matplotlib `Figure`."""
  from matplotlib.figure import Figure  # noqa: PLC0415
  from matplotlib.ticker import NullFormatter  # noqa: PLC0415
  k, p = config.kfac, parts["parts"]
  per_step = amortised_shares(config)
  widths = [r["width"] for r in scaling]
  fig = Figure(figsize=(10, 4))
  ax1, ax2 = fig.subplots(1, 2)
  names = [n for n in p if n in per_step]
  ax1.barh(names, [p[n] * per_step[n] * 1e3 for n in names])
  ax1.axvline(steps["sgd"] * 1e3, color="k", ls=":", label="SGD step")
  ax1.set_xlabel(f"ms per step (amortised: T_stats={k.stats_every}, T_inv={k.inverse_every})")
  ax1.legend()
  for method in kfac.INVERSIONS:
    ax2.loglog(widths, [r[method] for r in scaling], "o-", label=method)
  ax2.set_xticks(widths, [str(w) for w in widths])  # the measured widths, no minor labels
  ax2.xaxis.set_minor_formatter(NullFormatter())
  ax2.set_xlabel("factor width d")
  ax2.set_ylabel("seconds per inversion")
  ax2.legend()
  fig.suptitle(f"K-FAC step breakdown: {config.experiment}")
  fig.tight_layout()
  return fig
