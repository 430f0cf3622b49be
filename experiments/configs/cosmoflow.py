r"""CosmoFlow with hybrid data x spatial parallelism.

Run (the default variant is `demo`):

    python -m experiments.cosmoflow --config=experiments/configs/cosmoflow.py:demo \
        --workdir=runs/demo [--config.train.steps=300]

Variants (`:arg`):
  demo     mlperf trunk with the pooled head (model.head), 32³ crops of 64³ universes, each
           training crop under a random symmetry of the cube, 2 x 2 data x spatial mesh on
           4 virtual CPU devices, 300 steps of batch 8: ~3 min on a 2-core CPU. Validation
           MSE ends near 0.4 x the mean predictor's on Ω_m and 0.1-0.2 x on σ_8.
  smoke    seconds: lbann net at 32³, tiny data, 6 steps, mesh (-1, 2).
  default  mlperf net at 128³ (the MLPerf HPC setting), mesh (-1, 4) over real devices.
  lbann    the hybrid-parallel paper's network at 128³, mesh (-1, 4).
  large    lbann net on 512³ universes for real hardware: depth split 8 ways, bf16 compute.
  one_box  lbann net on whole 512³ universes on one 24 GiB CPU machine: its first two conv +
           pool blocks run in 16 depth slabs (peak RSS under 16 GiB); about a minute a step.

Any field can be overridden: `--config.mesh.shape="(1, 4)" --config.model.variant=lbann`.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "demo"
  c = ml_collections.ConfigDict()
  # sdl.process.configure(): allocator, BLAS threads, XLA flags. The entry point applies
  # them before NumPy loads, so turn them off on the command line:
  # --config.process.configure=False (or SDL_PROCESS_SETTINGS=0).
  c.process = dict(configure=True)
  c.seed = 0

  c.data = dict(
      source="generate",        # "generate" in memory | "disk": read data.path | "memory": load
                                # data.path into the devices' memory (distributed store)
      path="",                  # dataset directory (train/, val/) from experiments.make_dataset
      prefetch=2,               # batches read ahead on background threads
      input_size=32,            # crop side in voxels; volumes are [input_size]^3 x 4
      universe_size=64,         # generated universe side in voxels (crops are periodic)
      cell_mpc=4.0,             # voxel side in Mpc/h
      particles_per_voxel=4.0,  # mean count n̄ (sets the shot noise)
      train_universes=96,
      val_universes=16,
      crops_per_universe=2,
      augment=False,            # a random symmetry of the cube (axis permutation x flips) per
                                # training sample; needs data.source="generate"
  )
  c.model = dict(
      variant="mlperf",         # "mlperf" | "lbann"
      spatial_layers="auto",    # leading conv/pool layers run depth-split: "auto" (most valid) or "N"
      compute_dtype="float32",  # "bfloat16" for mixed precision (params stay float32)
      save_dtype="auto",        # "bfloat16": keep the convolutions' inputs for the backward
                                # pass in half the bytes, computing in compute_dtype; "auto": as computed
      conv_lowering="auto",     # "auto": folded onto 2D convs on CPU, native on GPU/TPU
      dropout="auto",           # the head's dropout: "auto" (the variant's published rate) or a rate
      head="flatten",           # "flatten": the published head on the last layer's output;
                                # "pooled": batch-normalised spatial means of every convolution
      # The first `slab_layers` conv/pool layers form the stem (0: none). With slabs > 1 it
      # runs one depth slab at a time, recomputed in the backward pass: the largest
      # activations never exist whole (sdl.models.slabs). Needs a mesh without a spatial split.
      slab_layers=0,
      slabs=1,
      stem_remat=False,         # recompute the stem in the backward pass (always, with slabs)
      # Blocks of the later layers recomputed in the backward pass, each with its policy:
      # (first layer, last layer, "full" | "save_convs") in layer order, e.g.
      # (("conv3", "avgpool4", "full"),); sdl.models.cosmoflow.REMAT_POLICIES says what each keeps
      remat=(),
      slab_progress=False,      # a progress line per slab, inside minute-long steps
  )
  c.optim = dict(name="adam", lr=1e-3, momentum=0.9, warmup_steps=20, decay="cosine",
                 weight_decay=0.0, clip_norm=1.0,
                 # name="kfac": any field of sdl.optim.schedules.KFAC_DEFAULTS overrides
                 # its default here; on a data x spatial mesh its statistics and inverses
                 # are spread over the devices (sdl.optim.kfac.Layout)
                 kfac=dict(damping=1e-3, stats_every=1, inverse_every=20, inversion="eigh",
                           max_factor_dim=0, factor_dtype="float32", comm_dtype="float32"))
  c.mesh = dict(
      shape=(2, 2),             # devices per axis; one entry may be -1 (the rest)
      axes=("data", "spatial"),  # any distinct names; `rules` map logical axes onto them
      # logical axis -> mesh axis: batch (data parallel), depth and height (spatial)
      rules=(("batch", "data"), ("depth", "spatial"), ("height", "spatial_h")),
      params="replicated",      # params and optimiser state: "replicated" | "fsdp" (over all devices)
      cpu_devices=4,            # emulate this many devices on a CPU host (None: real devices)
  )
  c.train = dict(steps=150, batch_size=4, log_every=10, eval_every=50,
                 checkpoint_every=50, keep_checkpoints=2,
                 skip_nonfinite=False)  # True: skip NaN/inf updates (counted), go on
  c.log = dict(shown=("loss", "mae", "lr", "eval_loss", "eval_mae"),  # on the progress line
               plot_train=("loss",),  # eval_baseline_loss: the mean predictor's, for scale
               plot_eval=("eval_loss", "eval_baseline_loss", "eval_mae"))

  if arg == "smoke":
    c.model.variant = "lbann"  # the cheaper network: seconds per step even on one core
    c.data.update(universe_size=32, train_universes=8, val_universes=4, crops_per_universe=1)
    c.mesh.update(shape=(-1, 2), cpu_devices=2)
    c.train.update(steps=6, batch_size=4, log_every=2, eval_every=3, checkpoint_every=3)
    c.optim.update(warmup_steps=2)
  elif arg == "demo":
    # The pooled head and the cube's symmetries: with the published flatten head, 150 steps
    # left Ω_m at the mean predictor's error (docs/benchmarks.md, CosmoFlow demo).
    c.model.update(head="pooled", dropout="0")
    c.data.update(augment=True, val_universes=64)
    c.train.update(steps=300, batch_size=8, eval_every=100, checkpoint_every=100)
  elif arg in ("default", "lbann"):
    c.data.update(input_size=128, universe_size=256, cell_mpc=2.0, train_universes=512,
                  val_universes=64, crops_per_universe=8)
    c.model.variant = "mlperf" if arg == "default" else "lbann"
    c.mesh.update(shape=(-1, 4), cpu_devices=None)
    c.optim.update(name="sgd", lr=0.01, warmup_steps=200)
    c.train.update(steps=5000, batch_size=16, log_every=50, eval_every=500,
                   checkpoint_every=500)
  elif arg == "large":
    c.data.update(input_size=512, universe_size=512, cell_mpc=1.0, train_universes=1024,
                  val_universes=64, crops_per_universe=1)
    c.model.update(variant="lbann", compute_dtype="bfloat16")
    c.mesh.update(shape=(-1, 8), cpu_devices=None)
    c.optim.update(name="sgd", lr=0.01, warmup_steps=200)
    c.train.update(steps=10000, batch_size=8, log_every=50, eval_every=1000,
                   checkpoint_every=500)
  elif arg == "one_box":
    # generating a 512³ universe takes ~1 min and 6 GiB (one at a time when memory is short)
    c.data.update(input_size=512, universe_size=512, cell_mpc=1.0, train_universes=2,
                  val_universes=1, crops_per_universe=1, prefetch=1)
    c.model.update(variant="lbann", slab_layers=4, slabs=16, slab_progress=True)
    c.mesh.update(shape=(1, 1), cpu_devices=1)
    c.optim.update(name="sgd", lr=0.01, warmup_steps=2)
    c.train.update(steps=20, batch_size=1, log_every=1, eval_every=10, checkpoint_every=1)
  else:
    raise ValueError(f"unknown cosmoflow config variant {arg!r}: "
                     "choose demo, smoke, default, lbann, large or one_box")
  return c
