r"""The 8x8 digits through the generic trainer, with any sdl optimiser.

Run:

    python -m experiments.digits --config=experiments/configs/digits.py:autoencoder_kfac \
        --workdir=runs/digits_kfac

Variants (`:arg`, optionally `,smoke` for a seconds-long version used by the tests):
  autoencoder        the K-FAC papers' tanh autoencoder, SGD with momentum 0.9, lr 0.1
  autoencoder_kfac   the same with K-FAC (sampled Fisher, statistics every 10 steps,
                     Cholesky inverses every 20, KL clip), the settings of
                     `experiments/configs/kfac.py:digits_autoencoder`
  batchnorm_mlp      a BatchNorm classifier (model state), Adam
autoencoder_kfac: 44 s in all on the 2-core EPYC VM (compile 8 s), final eval loss 0.257.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, *mods = (arg or "autoencoder").split(",")
  c = ml_collections.ConfigDict()
  # sdl.process.configure(): turn off with --config.process.configure=False
  c.process = dict(configure=True)
  c.seed = 0
  c.model = dict(name="autoencoder")  # autoencoder | cnn | batchnorm_mlp
  c.optim = dict(name="sgd", lr=0.1, momentum=0.9, warmup_steps=0, decay="constant",
                 weight_decay=0.0, clip_norm=0.0,
                 kfac=dict(damping=1e-3, stats_every=10, inverse_every=20,
                           inversion="cholesky", kl_clip=1e-3, fisher="sampled"))
  c.mesh = dict(shape=(-1,), axes=("data",), rules=(("batch", "data"),), params="replicated",
                cpu_devices=0)  # emulate N CPU devices (0: the real ones)
  c.train = dict(steps=300, batch_size=1024, log_every=10, eval_every=50,
                 checkpoint_every=50, keep_checkpoints=2,
                 skip_nonfinite=False)  # True: skip NaN/inf updates (counted), go on
  c.eval = dict(batch_size=120)  # the 360 held-out digits in 3 batches
  c.log = dict(shown=("loss", "lr", "eval_loss"), plot_train=("loss",),
               plot_eval=("eval_loss",))
  if variant == "autoencoder":
    pass
  elif variant == "autoencoder_kfac":
    c.optim.update(name="kfac", lr=0.3)
  elif variant == "batchnorm_mlp":
    c.model.name = "batchnorm_mlp"
    c.optim.update(name="adam", lr=3e-3)
    c.train.batch_size = 256
    c.log.shown = ("loss", "accuracy", "eval_loss", "eval_accuracy")
  else:
    raise ValueError(f"unknown digits config variant {variant!r}: choose autoencoder, "
                     "autoencoder_kfac or batchnorm_mlp (optionally ',smoke')")
  for mod in mods:
    if mod != "smoke":
      raise ValueError(f"unknown digits config modifier {mod!r}: only 'smoke'")
    c.train.update(steps=8, batch_size=64, log_every=2, eval_every=4, checkpoint_every=4)
    c.optim.kfac.update(stats_every=2, inverse_every=3)
  return c
