r"""3D U-Net train-step time on this CPU: sdl against PyTorch, each in its own process.

    python -m experiments.unet3d_step_bench [--points=64:lbann,128:half] [--steps=3] \
        [--impls=sdl,torch]

For each point (`side:widths`; widths `lbann` = LBANN's unet3d, `half` = half of them):
one full training step of the same network (3³ convolutions without bias, BatchNorm in
training mode, ReLU, 2³ max-pool, 2³ stride-2 transposed convolutions keeping their
channels, skip concatenation, a 1³ classifier to 3 classes, voxel-mean softmax
cross-entropy, Adam; no biases, as in LBANN) on one `side`³ x 1 volume, batch 1, float32. Each implementation runs
in a fresh process (so neither inherits the other's threads, allocator or caches): one
warm-up step (compile, allocation), then the median of `--steps` steps. sdl runs its CPU
defaults (`sdl.process.configure`, the folded convolution and `depth_to_space` lowerings);
PyTorch runs channels-first (oneDNN's preferred layout) with as many threads as cores.
Prints the table for docs/benchmarks.md; the target (issue 26) is torch / sdl ≥ 1.0.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

_POINTS = flags.DEFINE_list("points", ["64:lbann", "128:half"], "side:widths to time.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (median kept).")
_IMPLS = flags.DEFINE_list("impls", ["sdl", "torch"], "Implementations: sdl, torch.")
_CHILD = flags.DEFINE_string("child", None, "Internal: time one impl:side:widths and print JSON.")

WIDTHS = {"lbann": (((32, 64), (64, 128), (128, 256)), (256, 512)),
          "half": (((16, 32), (32, 64), (64, 128)), (128, 256))}
CLASSES = 3


def sdl_step(side: int, widths: str):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from experiments.trainers.unet3d import make_loss, step_model  # noqa: PLC0415
  from sdl.models.unet3d import UNet3D  # noqa: PLC0415
  from sdl.train.step import init_state, make_train_step  # noqa: PLC0415

  down, bottom = WIDTHS[widths]
  module = UNet3D(classes=CLASSES, down=down, bottom=bottom)
  rng = np.random.default_rng(0)
  batch = {"volume": jnp.asarray(rng.standard_normal((1, side, side, side, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, CLASSES, (1, side, side, side)), jnp.uint8)}
  model, tx = step_model(module), optax.adam(1e-3)
  state = [init_state(model, tx, batch, 0)]
  step = jax.jit(make_train_step(model, make_loss(), tx), donate_argnums=0)
  count = sum(x.size for x in jax.tree.leaves(state[0].params))

  def run():
    state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics["loss"])
  return run, count


def torch_step(side: int, widths: str):
  import torch  # noqa: PLC0415
  from torch import nn  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  down, bottom = WIDTHS[widths]

  def block(c_in, outs):
    layers = []
    for c in outs:
      layers += [nn.Conv3d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm3d(c, momentum=0.1),
                 nn.ReLU(inplace=True)]
      c_in = c
    return nn.Sequential(*layers)

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.down, c, skips = nn.ModuleList(), 1, []
      for outs in down:
        self.down.append(block(c, outs))
        c = outs[-1]
        skips.append(c)
      self.bottom = block(c, bottom)
      c = bottom[-1]
      self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
      for outs, skip in zip(reversed(down), reversed(skips)):
        self.ups.append(nn.ConvTranspose3d(c, c, 2, stride=2, bias=False))
        self.up_blocks.append(block(c + skip, (outs[-1],) * 2))
        c = outs[-1]
      self.classify = nn.Conv3d(c, CLASSES, 1, bias=False)

    def forward(self, x):
      skips = []
      for b in self.down:
        x = b(x)
        skips.append(x)
        x = nn.functional.max_pool3d(x, 2)
      x = self.bottom(x)
      for up, b, skip in zip(self.ups, self.up_blocks, reversed(skips)):
        x = b(torch.cat([up(x), skip], 1))
      return self.classify(x)

  model = UNet()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.randn(1, 1, side, side, side)
  y = torch.randint(0, CLASSES, (1, side, side, side))

  def run():
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
  return run, sum(p.numel() for p in model.parameters())


def child(spec: str) -> dict:
  impl, side, widths = spec.split(":")
  run, params = (sdl_step if impl == "sdl" else torch_step)(int(side), widths)
  start = time.perf_counter()
  run()
  warmup = time.perf_counter() - start
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return {"impl": impl, "side": int(side), "widths": widths, "params": params,
          "warmup_s": warmup, "times_s": times}


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(child(_CHILD.value)), flush=True)
    return
  results = {}
  for point in _POINTS.value:
    side, widths = point.split(":")
    if widths not in WIDTHS:
      sys.exit(f"--points={point}: widths must be one of {tuple(WIDTHS)}")
    for impl in _IMPLS.value:
      print(f"{side}³ {widths} widths: {impl} ...", flush=True)
      out = subprocess.run([sys.executable, "-m", "experiments.unet3d_step_bench",
                            f"--child={impl}:{side}:{widths}", f"--steps={_STEPS.value}"],
                           capture_output=True, text=True)
      line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
      if out.returncode or line is None:
        sys.exit(f"{impl} at {point} failed:\n{out.stderr[-3000:]}")
      r = json.loads(line[len("RESULT "):])
      results[(point, impl)] = r
      print(f"  {r['params']:,} parameters; warm-up {r['warmup_s']:.1f} s; steps "
            + ", ".join(f"{t:.2f}" for t in r["times_s"]) + " s", flush=True)
  import jax  # noqa: PLC0415 (the versions line)
  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, jax {jax.__version__}"
        + (f", torch {__import__('torch').__version__}" if "torch" in _IMPLS.value else "")
        + f"; {time.strftime('%Y-%m-%d')}; batch 1, float32, median of {_STEPS.value} steps "
        "(min-max)\n")
  print("| point | parameters | " + " | ".join(f"{i} (s/step)" for i in _IMPLS.value)
        + " | torch / sdl |")
  print("|---" * (len(_IMPLS.value) + 3) + "|")
  for point in _POINTS.value:
    med = {i: statistics.median(results[(point, i)]["times_s"]) for i in _IMPLS.value}
    cells = [f"{med[i]:.2f} ({min(results[(point, i)]['times_s']):.2f}-"
             f"{max(results[(point, i)]['times_s']):.2f})" for i in _IMPLS.value]
    ratio = f"{med['torch'] / med['sdl']:.2f}" if {"torch", "sdl"} <= set(med) else ""
    params = results[(point, _IMPLS.value[0])]["params"]
    print(f"| {point.replace(':', '³ ')} widths | {params:,} | " + " | ".join(cells)
          + f" | {ratio} |")


if __name__ == "__main__":
  app.run(main)
