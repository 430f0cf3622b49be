r"""Per-layer benchmark suite (`python -m experiments.layer_bench`).

    python -m experiments.layer_bench --config=experiments/configs/layer_bench.py:cpu \
        --workdir=runs/layer_bench

Variants:
  smoke  seconds: 2 GEMMs, 2 dense layers, 2 DeepBench convs, CosmoFlow/U-Net layers at
         16³, a small transformer; 3 runs each. What the tests run.
  cpu    the full suite on this host's CPU: 29 DeepBench GEMMs, 10 dense layers (CosmoFlow's
         heads, BERT-base's MLP, ResNet-50's classifier, DeepBench), 14 DeepBench convs, all
         CosmoFlow (128³, batch 2) and 3D U-Net (64³) convs, the BERT-base block and its
         attention; fp32 and bf16 (on CPUs `default` is fp32, so it is skipped). About
         an hour on 2 cores.
  gpu    the same on a GPU, all three precisions (fp32 highest, default = TF32, bf16).

Some rows only: `--config.problems.only="lbann n2 4x4x4"` keeps the problems whose name
(the table's `layer` column) contains the string.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "cpu"
  c = ml_collections.ConfigDict()
  # sdl.process.configure(): allocator, BLAS threads, XLA flags. The entry point applies
  # them before NumPy loads, so turn them off on the command line:
  # --config.process.configure=False (or SDL_PROCESS_SETTINGS=0).
  c.process = dict(configure=True)
  c.problems = dict(gemm=True, dense=True, conv2d=True, conv3d=True, transformer=True,
                    limit=0,             # at most this many per kind (0: all)
                    only="",             # only problems whose name contains this
                    cosmoflow_size=128, cosmoflow_batch=2, unet_size=64,
                    seq=512, width=768, heads=12, mlp=3072)
  c.impls = ("xla", "xla-folded", "numpy", "torch")
  c.precisions = ("highest", "bf16")
  c.passes = ("forward", "forward+backward")
  c.runs, c.warmup = 20, 2
  c.peak_gemm = 4096        # side of the square GEMM that measures the peak
  c.copy_mib = 512          # size of the copy that measures bandwidth
  if arg == "smoke":
    c.problems.update(limit=2, cosmoflow_size=16, unet_size=16, seq=64, width=64, heads=4,
                      mlp=256)
    c.runs, c.warmup, c.peak_gemm, c.copy_mib = 3, 1, 256, 16
  elif arg == "gpu":
    c.precisions = ("highest", "default", "bf16")
    c.peak_gemm = 8192
    c.copy_mib = 2048
  elif arg != "cpu":
    raise ValueError(f"unknown layer_bench variant {arg!r}: choose smoke, cpu or gpu")
  return c
