r"""3D U-Net segmentation with hybrid data x spatial parallelism.

Run (the default variant is `demo`):

    python -m experiments.unet3d --config=experiments/configs/unet3d.py:demo \
        --workdir=runs/unet3d

Variants (`:arg`):
  smoke  seconds: a tiny U-Net (2 levels, widths 4-16) on 16³ volumes, mesh (-1, 2) on 2
         virtual CPU devices, 6 steps.
  demo   LBANN's 3 levels at a quarter of its widths on 32³ synthetic volumes, a 2 x 2
         data x spatial mesh of 4 virtual CPU devices; Dice per class on held-out volumes
         and a PNG of slices (`slices.png`).
  large  LBANN's unet3d at full widths on 256³ volumes for real hardware: depth split 8
         ways (blocks that cannot split run data-parallel), bf16 compute.

The volumes are synthetic (`sdl.data.segmentation`): 3 classes that differ in texture and
shape, with the same intensity distribution.

Any field can be overridden, e.g. `--config.model.layouts=spatial,data,data,data,data,data,spatial`
(one layout per block: down1..downL, bottom, upL..up1; "spatial", "depth" or "data"), or
`--config.model.norm=group`.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "demo"
  c = ml_collections.ConfigDict()
  c.process = dict(configure=True)  # sdl.process.configure() (see configs/cosmoflow.py)
  c.seed = 0
  c.data = dict(source="generate",  # "generate" (in memory) | "disk" | "memory" (data.path)
                path="",            # a directory with train/ and val/ datasets written by
                                    # `python -m experiments.make_dataset --config=<this>`
                crop_size=32, train_volumes=64, val_volumes=8, balls=3, rods=2, radius=6.0)
  c.model = dict(
      classes=3,
      down=((8, 16), (16, 32), (32, 64)),  # LBANN: ((32, 64), (64, 128), (128, 256))
      bottom=(64, 128),                    # LBANN: (256, 512)
      norm="batch",             # "batch" (statistics over the whole batch and volume) | "group"
      groups=8,                 # GroupNorm's groups
      layouts="auto",           # "auto" (split every block that can) or one layout per block,
                                # comma-separated: "spatial,data,data,data,data,data,spatial"
      class_weights=(),         # () or one weight per class for the cross-entropy
      compute_dtype="float32",
      conv_lowering="auto",
  )
  c.optim = dict(name="adam", lr=3e-3, momentum=0.9, warmup_steps=20, decay="cosine",
                 weight_decay=0.0, clip_norm=1.0)
  c.mesh = dict(shape=(2, 2), axes=("data", "spatial"),
                rules=(("batch", "data"), ("depth", "spatial"), ("height", "spatial_h")),
                params="replicated", cpu_devices=4)
  c.train = dict(steps=300, batch_size=4, log_every=10, eval_every=100, checkpoint_every=100,
                 keep_checkpoints=2, skip_nonfinite=False)
  c.log = dict(shown=("loss", "accuracy", "lr", "eval_dice_mean"),
               plot_train=("loss",), plot_eval=("eval_dice_mean", "eval_dice_foreground"))

  if arg == "smoke":
    c.data.update(crop_size=16, train_volumes=4, val_volumes=2, radius=4.0)
    c.model.update(down=((4, 8), (8, 8)), bottom=(8, 16))
    c.mesh.update(shape=(-1, 2), cpu_devices=2)
    c.train.update(steps=6, batch_size=2, log_every=2, eval_every=3, checkpoint_every=3)
    c.optim.update(warmup_steps=2)
  elif arg == "demo":
    pass
  elif arg == "large":
    c.data.update(crop_size=256, train_volumes=256, val_volumes=16, balls=40, rods=25,
                  radius=24.0)
    c.model.update(down=((32, 64), (64, 128), (128, 256)), bottom=(256, 512),
                   compute_dtype="bfloat16")
    c.mesh.update(shape=(-1, 8), cpu_devices=None)
    c.train.update(steps=5000, batch_size=8, log_every=20, eval_every=500,
                   checkpoint_every=250)
  else:
    raise ValueError(f"unknown unet3d config variant {arg!r}: choose smoke, demo or large")
  return c
