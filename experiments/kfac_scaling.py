"""Distributed K-FAC at scale, on paper (see experiments/trainers/kfac_scaling.py).

    python -m experiments.kfac_scaling --out=runs/kfac_scaling [--calibration_batch=2]

Calibrates `sdl.bench.kfac_model` on this machine, checks its statistics, inversion and
preconditioning times against measured ones and its communicated bytes against the
compiled step's HLO, then predicts a ResNet-50 K-FAC step on 16 to 2,048 V100s, part by
part. Writes OUT/kfac_scaling.md and OUT/kfac_scaling.png.
"""
import os
import platform

from absl import app, flags

from sdl.parallel import ensure_cpu_devices

_OUT = flags.DEFINE_string("out", "runs/kfac_scaling", "directory for the table and the plot")
_BATCH = flags.DEFINE_integer("calibration_batch", 2,
                              "images per ResNet-50 layer timing on this machine")
_DEVICES = flags.DEFINE_list("devices", ["16", "64", "256", "1024", "2048"],
                             "V100 counts to predict")


_COMPUTE = flags.DEFINE_string("compute", "", "Internal: measure this machine's compute in "
                                "a one-device process and write it to this JSON file.")


def autoencoder():
  """(config, problem, K-FAC layers, batch input) of the parts check."""
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments.configs import kfac as kfac_configs  # noqa: PLC0415
  from experiments.trainers import kfac_profile  # noqa: PLC0415
  from sdl.optim import kfac  # noqa: PLC0415
  config = kfac_configs.get_config("digits_autoencoder")
  # the model prices eigendecompositions (the general inversion; the config's own choice,
  # Cholesky, is cheaper for its well-conditioned factors)
  config.kfac.inversion = "eigh"
  problem = kfac_profile.make_problem(config)
  x = jnp.asarray(problem.batch(0)["x"])
  layers = kfac.select_layers(kfac.find_layers(problem.model, x[:1]), config.kfac.max_factor_dim,
                              config.kfac.wide_conv)
  return config, problem, layers, x


def positions_of(problem, layers, x) -> dict[str, int]:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from sdl.optim import kfac  # noqa: PLC0415
  forward = kfac.module_forward(problem.model, x)
  params = problem.model.init(jax.random.key(0), x[:1])["params"]
  shapes = jax.eval_shape(lambda: kfac.zero_perturbations(forward, layers, params))
  return {name: int(np.prod(s.shape[1:-1])) for name, s in kfac.by_layer(shapes).items()}


def measure_compute(path: str) -> None:
  """This machine's rates and the autoencoder's K-FAC parts, on one device: a backend
  split into 8 virtual devices runs XLA:CPU's small GEMMs slower (the autoencoder's
  statistics took 7.0 ms there against 4.9 ms), and the model prices one device's work."""
  import dataclasses  # noqa: PLC0415
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from experiments.trainers import kfac_profile  # noqa: PLC0415
  from experiments.trainers import kfac_scaling as ks  # noqa: PLC0415
  from sdl.bench import kfac_model  # noqa: PLC0415

  log = lambda text: print(text, file=sys.stderr, flush=True)
  gemm = ks.gemm_rate()
  eighs = ks.eigh_rate()
  config, problem, layers, x = autoencoder()
  measured = kfac_profile.step_parts(config, problem, runs=5)
  positions = positions_of(problem, layers, x)
  model_layers = [kfac_model.layer_of(spec, positions[name]) for name, spec in layers.items()]
  rows = {x.shape[0] * l.positions for l in model_layers}
  assert len(rows) == 1, rows  # one curve serves every layer (dense: rows = the batch)
  curve = ks.gemm_curve(gemm, rows.pop())
  relative = ks.layer_efficiency(kfac_model.resnet50(), gemm, batch=_BATCH.value, progress=log)
  with open(path, "w") as f:
    json.dump({"gemm": gemm, "eighs": eighs, "parts": measured["parts"], "batch": x.shape[0],
               "layers": [dataclasses.asdict(l) for l in model_layers],
               "curve": curve, "relative": relative}, f)


def main(argv):
  del argv
  if _COMPUTE.value:
    measure_compute(_COMPUTE.value)
    return
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  os.makedirs(_OUT.value, exist_ok=True)
  compute_json = os.path.join(_OUT.value, "compute.json")
  print("measuring this machine's compute (one device) ...", flush=True)
  subprocess.run([sys.executable, "-m", "experiments.kfac_scaling", f"--compute={compute_json}",
                  f"--calibration_batch={_BATCH.value}"], check=True)
  with open(compute_json) as f:
    compute = json.load(f)

  ensure_cpu_devices(8)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from experiments.trainers import kfac_scaling as ks  # noqa: PLC0415
  from sdl.bench import kfac_model  # noqa: PLC0415
  from sdl.bench.hlo import collective_bytes  # noqa: PLC0415
  from sdl.optim import kfac  # noqa: PLC0415
  from sdl.train.step import Model, TrainState, make_train_step  # noqa: PLC0415

  lines = []

  def say(text=""):
    print(text, flush=True)
    lines.append(text)

  say(f"# K-FAC performance model: {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores, jax {jax.__version__}")
  gemm, eighs = compute["gemm"], {int(n): r for n, r in compute["eighs"].items()}
  eigh = eighs[max(eighs)]
  curve = {int(w): e for w, e in compute["curve"].items()}
  say(f"\nThis machine (one device): fp32 GEMM {gemm / 1e9:.1f} GFLOP/s; eigh "
      + ", ".join(f"n={n}: {r:.3g} n³/s" for n, r in eighs.items()))
  say(f"\n`x.T @ x` for `x` of {compute['batch']:,} rows, efficiency against that rate by "
      "width: " + ", ".join(f"{w}: {e:.2f}" for w, e in curve.items()))

  # ---- the parts measured here against the model --------------------------------------
  config, problem, layers, x = autoencoder()
  positions = positions_of(problem, layers, x)
  model_layers = [kfac_model.Layer(**l) for l in compute["layers"]]
  say(f"\n## Parts on this machine: {config.experiment}, batch {x.shape[0]}, "
      f"{len(layers)} K-FAC layers, one device\n")
  say("| part | model at the large-GEMM and eigh rates (s) | model, rates by width (s) | "
      "measured (s) | model / measured: large rates, by width |")
  say("|---|---|---|---|---|")
  flat = ks.check_parts(compute["parts"], model_layers, x.shape[0], gemm, eigh)
  by_width = ks.check_parts(compute["parts"], model_layers, x.shape[0], gemm,
                            ks.width_efficiency(eighs), ks.width_efficiency(curve))
  for (part, predicted, got), (_, shaped, _) in zip(flat, by_width):
    say(f"| {part} | {predicted:.2e} | {shaped:.2e} | {got:.2e} | {predicted / got:.2f}, "
        f"{shaped / got:.2f} |")
  params = problem.model.init(jax.random.key(0), x[:1])["params"]

  # ---- bytes: the compiled data-parallel step's all-reduces against the model ----------
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  tx = optax.chain(kfac.kfac(layers, axis_names=("data",), grad_factors=False),
                   optax.sgd(0.1))
  grads_fn = kfac.gradients(layers, axis_names=("data",), grad_factors=False)
  step = make_train_step(Model(problem.model), problem.loss_fn, tx, gradients=grads_fn,
                         mesh=mesh, batch_axes=("data",))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(1)))
  batch = {k: jnp.asarray(v) for k, v in problem.batch(0).items()}
  hlo = jax.jit(step, static_argnums=2).lower(state, batch, kfac.Phase(True, True)).compile(
      ).as_text()
  got = collective_bytes(hlo)
  model_layers = [kfac_model.layer_of(spec, positions[name]) for name, spec in layers.items()]
  want = kfac_model.communicated_bytes(model_layers, kfac_model.Settings(
      batch=x.shape[0] // 8, grad_bytes=4, factor_bytes=4))
  say("\n## Bytes all-reduced by one data-parallel step with statistics and inverses "
      "(8 devices)\n")
  say("| collective | model (bytes) |\n|---|---|")
  for k, v in want.items():
    say(f"| {k} | {v:,.0f} |")
  say(f"| **total, model** | {sum(want.values()):,.0f} |")
  say(f"| **compiled HLO's all-reduces** | {got:,} |")
  say(f"\nThe HLO carries {got - sum(want.values()):,.0f} bytes more: the loss and metrics "
      "averaged, and the factor sums' counts.")

  # ---- all-reduce across 1, 2 and 4 processes here, against the model fitted on 2 -------
  say("\n## All-reduce across processes on this machine (gloo over loopback, 1 device "
      "per process)\n")
  measured_p = ks.measure_processes()
  alpha, beta = ks.fit_ring(measured_p[2])
  say(f"Fitted on 2 processes: α = {alpha * 1e6:.0f} µs, 1/β = {1 / beta / 1e9:.2f} GB/s.\n")
  say("| bytes | 1 process (s) | 2 processes (s) | 4 processes (s) | model, 4 (s) | "
      "4 measured / model |")
  say("|---|---|---|---|---|---|")
  loopback = kfac_model.Network(devices_per_node=8, alpha_intra=alpha, beta_intra=beta,
                                alpha_inter=alpha, beta_inter=beta)
  for nbytes in sorted(measured_p[2]):
    model4 = kfac_model.all_reduce_seconds(nbytes, 4, loopback)
    say(f"| {nbytes:,} | {measured_p[1][nbytes]:.2e} | {measured_p[2][nbytes]:.2e} | "
        f"{measured_p[4][nbytes]:.2e} | {model4:.2e} | {measured_p[4][nbytes] / model4:.2f} |")
  say("\nFour processes share 2 cores, so their all-reduce also waits for the cores: the "
      "4-process column bounds the model from above here and says nothing of a network; "
      "the 1-process column is the collective's fixed cost with nothing to send.")

  # ---- ResNet-50 at scale ------------------------------------------------------------------
  resnet = kfac_model.resnet50()
  say(f"\n## ResNet-50 on V100s (ABCI nodes: 4 GPUs, NVLink 2, 2 x EDR)\n\nLayer by layer "
      f"here, batch {_BATCH.value} per layer:")
  relative = compute["relative"]
  seen = set()
  for name, e in relative.items():  # one line per distinct layer shape (the same rate)
    if e not in seen:
      seen.add(e)
      say(f"  {name:<28} {e:.2f} of the GEMM rate")
  efficiency = ks.v100_efficiency(resnet, relative)
  v100_eigh = eigh / gemm * kfac_model.V100.gemm_flops
  flops = sum(l.flops for l in resnet)
  say(f"\nResNet-50 forward: {flops / 1e9:.2f} GFLOP per image, "
      f"{sum(l.params for l in resnet) / 1e6:.2f} M parameters in its "
      f"{len(resnet)} conv/dense layers. V100 assumptions: forward/backward at "
      f"{ks.V100_IMAGES_PER_S:.0f} images/s (the layers' relative efficiencies measured "
      f"here); eigh at {v100_eigh:.3g} n³/s (this machine's eigh/GEMM ratio times the V100's "
      "fp32 peak).")
  counts = tuple(int(d) for d in _DEVICES.value)
  results = ks.resnet50_at_scale(counts, 32, efficiency, v100_eigh)
  published = ks.published_step_seconds()
  for label, by_devices in results.items():
    say(f"\n### {label}, 32 images per GPU\n")
    say("| GPUs | " + " | ".join(kfac_model.PARTS) + " | step (ms) | 35 epochs (min) |")
    say("|---" * (len(kfac_model.PARTS) + 3) + "|")
    for p, parts in by_devices.items():
      total = sum(parts.values())
      minutes = ks.EPOCHS * ks.IMAGENET_TRAIN / (32 * p) * total / 60
      say(f"| {p} | " + " | ".join(f"{v * 1e3:.1f}" for v in parts.values())
          + f" | {total * 1e3:.1f} | {minutes:.1f} |")
  say("\n32 images per GPU is weak scaling: 2,048 GPUs make a mini-batch of 65,536, for "
      "which 35 epochs is an assumption, not a published result.")
  say(f"\nPublished (SP-NGD, TPAMI 2020): {ks.PUBLISHED['minutes']} min on "
      f"{ks.PUBLISHED['gpus']:,} V100s at mini-batch {ks.PUBLISHED['batch']:,}: "
      f"{published * 1e3:.0f} ms per step if it took {ks.EPOCHS} epochs.")
  png = os.path.join(_OUT.value, "kfac_scaling.png")
  ks.plot(results, png, published)
  say(f"\nwrote {png}")
  with open(os.path.join(_OUT.value, "kfac_scaling.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
