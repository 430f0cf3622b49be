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


def main(argv):
  del argv
  ensure_cpu_devices(8)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from experiments.configs import kfac as kfac_configs  # noqa: PLC0415
  from experiments.trainers import kfac_profile  # noqa: PLC0415
  from experiments.trainers import kfac_scaling as ks  # noqa: PLC0415
  from sdl.bench import kfac_model  # noqa: PLC0415
  from sdl.bench.hlo import collective_bytes  # noqa: PLC0415
  from sdl.optim import kfac  # noqa: PLC0415
  from sdl.train.step import Model, TrainState, make_train_step  # noqa: PLC0415

  os.makedirs(_OUT.value, exist_ok=True)
  lines = []

  def say(text=""):
    print(text, flush=True)
    lines.append(text)

  say(f"# K-FAC performance model: {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores, jax {jax.__version__}")
  gemm = ks.gemm_rate()
  eighs = ks.eigh_rate()
  eigh = eighs[max(eighs)]
  say(f"\nThis machine: fp32 GEMM {gemm / 1e9:.1f} GFLOP/s; eigh "
      + ", ".join(f"n={n}: {r:.3g} n³/s" for n, r in eighs.items()))

  # ---- the parts measured here against the model --------------------------------------
  config = kfac_configs.get_config("digits_autoencoder")
  problem = kfac_profile.make_problem(config)
  measured = kfac_profile.step_parts(config, problem, runs=5)
  layers = measured["layers"]
  x = jnp.asarray(problem.batch(0)["x"])
  forward = kfac.module_forward(problem.model, x)
  params = problem.model.init(jax.random.key(0), x[:1])["params"]
  shapes = jax.eval_shape(lambda: kfac.zero_perturbations(forward, layers, params))
  positions = {name: int(np.prod(s.shape[1:-1])) for name, s in kfac.by_layer(shapes).items()}
  say(f"\n## Parts on this machine: {config.experiment}, batch {x.shape[0]}, "
      f"{len(layers)} K-FAC layers\n")
  say("| part | model (s) | measured (s) | model / measured |")
  say("|---|---|---|---|")
  for part, predicted, got in ks.check_parts(measured["parts"], layers, positions,
                                             x.shape[0], gemm, eigh):
    say(f"| {part} | {predicted:.2e} | {got:.2e} | {predicted / got:.2f} |")

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
  relative = ks.layer_efficiency(resnet, gemm, batch=_BATCH.value, progress=say)
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
