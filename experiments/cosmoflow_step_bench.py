r"""CosmoFlow train-step time: sdl's conv lowerings against PyTorch on the same machine.

    python -m experiments.cosmoflow_step_bench [--variants=mlperf,lbann] [--size=128] \
        [--batch=2] [--steps=5] [--dtype=float32|bfloat16] [--lowerings=native,folded]

For each network: one full training step (forward, backward, SGD-momentum update) on one
device at `size`³ x 4, batch `batch`, timed after a warm-up (compile) step, median of
`--steps`, with the spread; the columns take turns, step by step. Columns: sdl with the
native XLA 3D convolution, sdl with the depth-folded lowering (`sdl.models.conv`, the CPU
default, whose first layers and long-row layers run `sdl.kernels.conv3d`'s direct
kernel), `folded-xla` (the same without that kernel), and PyTorch (`torch`, if
installed; CPU threads = cores) running the same network (same layers, same parameter
count) in float32, channels-first as its oneDNN kernels prefer. The networks are built
from the same layer list (`sdl.models.cosmoflow.feature_layers`).

A second table gives each column's model FLOP utilisation (MFU): the step's model FLOPs
(`sdl.bench.problems.cosmoflow_step_flops`: convolution taps on real input and dense
layers, forward and backward) per second, against the GEMM peak measured in the same run
through JAX (`sdl.bench.suite.measure_peak`, `--peak_size`³, the step's precision) and,
on a known accelerator, against the vendor's dense peak (`sdl.bench.roofline.nominal`).
On a GPU, run `--lowerings=native` (the folded lowering is for CPUs) and `--dtype=bfloat16`
for mixed precision; PyTorch then runs on CUDA if it can, and only in float32.
"""
import contextlib
import os
import platform
import statistics
import time

from absl import app, flags

_VARIANTS = flags.DEFINE_list("variants", ["mlperf", "lbann"], "CosmoFlow networks.")
_SIZE = flags.DEFINE_integer("size", 128, "Input side in voxels.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median kept).")
_LOWERINGS = flags.DEFINE_list(
    "lowerings", ["native", "folded"],
    "sdl conv lowerings: native, folded (the CPU default), folded-xla (folded without "
    "sdl's direct convolution kernel, sdl.kernels.conv3d).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "sdl's compute dtype (parameters stay float32).")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 4096, "Side of the GEMM that measures the peak.")


def sdl_step(variant: str, size: int, batch: int, lowering: str, dtype: str = "float32"):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from sdl.models.cosmoflow import CosmoFlow  # noqa: PLC0415
  from sdl.train.step import Model, TrainState, make_train_step  # noqa: PLC0415

  from sdl.kernels import conv3d as direct_kernels  # noqa: PLC0415
  direct = lowering != "folded-xla"
  lowering = "folded" if lowering == "folded-xla" else lowering
  model = CosmoFlow(variant, size, conv_lowering=lowering, dtype=jnp.dtype(dtype))
  rng = np.random.default_rng(0)
  batch_data = {"volume": jnp.asarray(rng.poisson(3, (batch, size, size, size, 4)), jnp.int16),
                "label": jnp.asarray(rng.uniform(-1, 1, (batch, 4)), jnp.float32)}
  params = model.init(jax.random.key(0), batch_data["volume"][:1])["params"]
  tx = optax.sgd(1e-3, momentum=0.9)

  def loss_fn(pred, b):
    return jnp.mean((pred - b["label"]) ** 2), {}
  step_model = Model(model, inputs=lambda b: (b["volume"],),
                     kwargs=lambda key, train: {"train": train, "rngs": {"dropout": key}})
  step = jax.jit(make_train_step(step_model, loss_fn, tx), donate_argnums=0)
  state = [TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      jax.random.key_data(jax.random.key(1)))]

  def run():
    state[0], metrics = step(state[0], batch_data)
    jax.block_until_ready(metrics["loss"])
  with contextlib.nullcontext() if direct else direct_kernels.disabled():
    run()  # warm-up: compile (the direct kernel's use is decided here), allocate
  return run


def torch_step(variant: str, size: int, batch: int, device: str = "cpu"):
  import torch  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  from sdl.models.cosmoflow import HEAD, LEAKY_SLOPE, feature_layers  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  slope = LEAKY_SLOPE[variant]
  layers, channels, side = [], 4, size
  for layer in feature_layers(variant, size):
    w = layer.window
    if layer.kind == "conv":
      layers += [nn.Conv3d(channels, layer.features, w.kernel, w.stride, w.padding[0],
                           bias=layer.use_bias), nn.LeakyReLU(slope)]
      channels = layer.features
    elif layer.kind == "maxpool":
      layers.append(nn.MaxPool3d(w.kernel, w.stride, w.padding[0]))
    else:
      layers.append(nn.AvgPool3d(w.kernel, w.stride, w.padding[0], count_include_pad=True))
    side = w.out_size(side)
  hidden, rate = HEAD[variant]
  width = channels * side ** 3
  layers.append(nn.Flatten())
  for h in hidden:
    layers += [nn.Linear(width, h), nn.LeakyReLU(slope), nn.Dropout(rate)]
    width = h
  layers.append(nn.Linear(width, 4))
  model = nn.Sequential(*layers).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  x = torch.poisson(torch.full((batch, 4, size, size, size), 3.0)).log1p().to(device)
  y = (torch.rand(batch, 4) * 2 - 1).to(device)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    if device != "cpu":
      torch.cuda.synchronize()
  return run, sum(p.numel() for p in model.parameters())


def torch_device(backend: str, dtype: str) -> str | None:
  """Where the PyTorch reference runs: beside sdl on the same kind of device, or not at all."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  if dtype != "float32":
    return None
  if backend == "cpu":
    return "cpu"
  return "cuda" if backend == "gpu" and torch.cuda.is_available() else None


def utilisation_table(rows, flops: dict, peaks: dict[str, float], nominal) -> list[str]:
  """Markdown lines: each column's GFLOP/s and MFU against the measured and nominal peaks."""
  peak = max(peaks.values())
  each = ", ".join(f"{impl} {rate / 1e9:.1f}" for impl, rate in peaks.items())
  head = f"| network | model GFLOP/step | column | GFLOP/s | MFU (measured peak {peak / 1e9:.1f}) |"
  lines = [f"measured peak: GEMM through JAX, best of {each} GFLOP/s"
           + (f"; nominal: {nominal.name} {nominal.peak_flops / 1e12:.1f} TFLOP/s"
              if nominal else ""), "",
           head + (" MFU (nominal) |" if nominal else ""),
           "|---" * (6 if nominal else 5) + "|"]
  for variant, results in rows:
    for name, times in results.items():
      rate = flops[variant] / statistics.median(times)
      cell = (f"| {variant} | {flops[variant] / 1e9:.1f} | {name} | {rate / 1e9:.1f} | "
              f"{100 * rate / peak:.0f} % |")
      lines.append(cell + (f" {100 * rate / nominal.peak_flops:.1f} % |" if nominal else ""))
  return lines


def main(argv):
  del argv
  import jax  # noqa: PLC0415

  from sdl.bench import problems, roofline, suite, timing  # noqa: PLC0415
  backend = jax.default_backend()
  device = torch_device(backend, _DTYPE.value)
  size, batch = _SIZE.value, _BATCH.value
  rows = []
  for variant in _VARIANTS.value:
    runs = {}
    for lowering in _LOWERINGS.value:
      print(f"{variant} sdl {lowering} ...", flush=True)
      runs[f"sdl {lowering}"] = sdl_step(variant, size, batch, lowering, _DTYPE.value)
    if device:
      print(f"{variant} torch ({device}) ...", flush=True)
      run, n_params = torch_step(variant, size, batch, device)
      print(f"  torch parameters: {n_params:,}", flush=True)
      run()  # warm-up
      runs["torch"] = run
    print(f"{variant}: {_STEPS.value} steps of each, in turns ...", flush=True)
    times = timing.times_interleaved([(run, ()) for run in runs.values()], 0, _STEPS.value)
    rows.append((variant, dict(zip(runs, map(list, times)))))
    del runs
  precision = "bf16" if _DTYPE.value == "bfloat16" else (
      "highest" if backend == "cpu" else "default")  # the peak in the step's own precision
  print("measuring the GEMM peak ...", flush=True)
  peaks = suite.measure_peak(_PEAK_SIZE.value, precision)
  kind = jax.devices()[0].device_kind
  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {backend} ({kind}); "
        f"{time.strftime('%Y-%m-%d')}; {size}³ x 4, batch {batch}, {_DTYPE.value}, "
        f"median of {_STEPS.value} steps (min-max)\n")
  names = list(rows[0][1])
  has_ratio = "torch" in names and "sdl folded" in names
  print("| network | " + " | ".join(f"{n} (s/step)" for n in names)
        + (" | torch / sdl folded |" if has_ratio else " |"))
  print("|---" * (len(names) + 1 + has_ratio) + "|")
  for variant, results in rows:
    med = {k: statistics.median(v) for k, v in results.items()}
    cells = [f"{med[k]:.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in results.items()]
    ratio = (f" | {med['torch'] / med['sdl folded']:.2f} |"
             if "torch" in med and "sdl folded" in med else " |")
    print(f"| {variant} | " + " | ".join(cells) + ratio)
  flops = {variant: problems.cosmoflow_step_flops(variant, size, batch) for variant, _ in rows}
  print("\n" + "\n".join(utilisation_table(rows, flops, peaks, roofline.nominal(kind, precision))))


if __name__ == "__main__":
  app.run(main)
