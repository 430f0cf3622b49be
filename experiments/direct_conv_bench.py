r"""sdl's direct CPU convolution kernel against the folded lowering, per layer shape.

    python -m experiments.direct_conv_bench [--shapes=2x128x4x32,2x64x32x64] [--runs=5] \
        [--stream_bytes=-1]

Each shape is `batch x side x C x O`: a 3 x 3 x 3 stride-1 convolution of a pre-padded
cubic `side + 2` input. For each, the forward pass and the kernel gradient through
`sdl.kernels.conv3d` (`forward`, `kernel_grad`) and through the depth-folded lowering
(`sdl.models.conv.fold_depth` and its kernel gradient), jitted, median of `--runs` after
a warm-up, in GFLOP/s (2 x positions x 27 x C x O per pass). These are the measurements
behind `sdl.kernels.conv3d.use_direct`'s thresholds (docs/design/direct-kernel.md).
`--stream_bytes` overrides `sdl.kernels.conv3d.STREAM_BYTES` (-1: no streaming stores).
"""
import numpy as np
from absl import app, flags

_SHAPES = flags.DEFINE_list(
    "shapes", ["2x128x4x32", "2x128x4x16", "2x64x32x64", "2x64x64x32", "2x32x64x128",
               "2x16x128x256", "2x8x256x512", "2x4x128x256"],
    "batch x side x C x O, comma-separated.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per cell (median kept).")
_STREAM_BYTES = flags.DEFINE_integer("stream_bytes", None,
                                     "Override sdl.kernels.conv3d.STREAM_BYTES.")


def main(argv):
  del argv
  import jax  # noqa: PLC0415

  from sdl.bench.timing import measure  # noqa: PLC0415
  from sdl.kernels import conv3d as direct_kernels  # noqa: PLC0415
  from sdl.models import conv  # noqa: PLC0415
  if _STREAM_BYTES.value is not None:
    direct_kernels.STREAM_BYTES = _STREAM_BYTES.value

  rng = np.random.default_rng(0)
  print("| batch x side x C → O | direct fwd | folded fwd | direct kernel grad | "
        "folded kernel grad |")
  print("|---|---|---|---|---|")
  for shape in _SHAPES.value:
    n, side, c, o = (int(v) for v in shape.split("x"))
    x = jax.numpy.asarray(rng.standard_normal((n, side + 2, side + 2, side + 2, c), np.float32))
    k = jax.numpy.asarray(rng.standard_normal((3, 3, 3, c, o), np.float32))
    dy = jax.numpy.asarray(rng.standard_normal((n, side, side, side, o), np.float32))
    flops = 2 * n * side ** 3 * 27 * c * o
    folded = lambda x, k: conv.fold_depth(x, k, (1, 1, 1), (0, 0))  # noqa: E731
    cells = [
        (jax.jit(direct_kernels.forward), (x, k)),
        (jax.jit(folded), (x, k)),
        (jax.jit(lambda x, dy: direct_kernels.kernel_grad(x, dy, k.shape)), (x, dy)),
        (jax.jit(lambda x, k, dy: jax.vjp(lambda k: folded(x, k), k)[1](dy)[0]), (x, k, dy)),
    ]
    rates = [flops / measure(fn, *args, warmup=1, runs=_RUNS.value).median_s / 1e9
             for fn, args in cells]
    print(f"| {n} x {side}³ x {c} → {o} | " + " | ".join(f"{r:.0f}" for r in rates) + " |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
