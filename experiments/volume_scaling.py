"""Bigger volumes, better predictions: CosmoFlow on small crops against whole volumes.

    python -m experiments.volume_scaling [--variant=full|smoke] [--seeds=3] \
        [--workdir=runs/volume_scaling]

On one fixed set of generated universes (the same physics and the same universes for every
run), the same conv trunk (mlperf; its dense head follows the input size) trains on
(a) random crops a quarter of the universe's side and (b) whole universes, for the same
steps and batch, so both see the same number of samples; their FLOPs are reported. Each
(input, seed) run is a CosmoFlow training run in its own process and work directory
(`experiments.cosmoflow`'s trainer), so an interrupted experiment resumes where it stopped;
each ends by writing its predictions on the held-out universes (`predictions.npz`).

Then, per parameter, the validation MSE (labels' [-1, 1] units) of:
* the single-crop model (every crop of each held-out universe, scored one by one);
* the crop ensemble (the crop model's predictions averaged over all the universe's
  non-overlapping crops): what a crop model gets from the whole volume;
* the whole-volume model;
* the Gaussian Fisher forecast for one whole universe (`sdl.data.fisher`), a forecast, not
  a bound; and the mean predictor.

It writes `results.json`, a markdown table and `predicted_vs_true.png` in `--workdir`.
"""
import json
import os
import subprocess
import sys

from absl import app, flags

_VARIANT = flags.DEFINE_enum("variant", "full", ["full", "smoke"], "Sizes and steps.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds per input (the universes stay fixed).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/volume_scaling", "Where runs and results go.")
_RUN = flags.DEFINE_string("run", "", "Internal: train and predict one run, 'crops:SEED' or "
                                      "'whole:SEED'.")

INPUTS = ("crops", "whole")
DATA_SEED = 0  # the universes, the same for every run


def settings(variant: str) -> dict:
  if variant == "smoke":
    return dict(universe=64, crop=32, train_universes=8, val_universes=2, crops_per_universe=2,
                steps=2, batch=2)
  # 128³ universes of 4 Mpc/h voxels (512 Mpc/h), crops of 32³; 3,000 steps of batch 4
  # (12,000 samples: 24 passes over the 512 training universes' whole volumes).
  return dict(universe=128, crop=32, train_universes=512, val_universes=32,
              crops_per_universe=4, steps=3000, batch=4)


def run_config(variant: str, kind: str, seed: int):
  from experiments.configs.cosmoflow import get_config  # noqa: PLC0415
  s = settings(variant)
  c = get_config("demo")
  c.seed = seed
  c.data.update(seed=DATA_SEED, universe_size=s["universe"], train_universes=s["train_universes"],
                val_universes=s["val_universes"],
                input_size=s["crop"] if kind == "crops" else s["universe"],
                crops_per_universe=s["crops_per_universe"] if kind == "crops" else 1)
  c.model.update(dropout="0", head="flatten")  # the published trunk and head, as measured
  c.data.augment = False
  c.mesh.update(shape=(1, 1), cpu_devices=None)
  c.train.update(steps=s["steps"], batch_size=s["batch"],
                 log_every=max(1, min(50, s["steps"] // 2)),
                 eval_every=max(1, s["steps"] // 6), checkpoint_every=max(1, s["steps"] // 30))
  return c


def held_out_crops(volume, crop: int):
  """All non-overlapping `crop`³ crops of a universe, `[n, crop, crop, crop, C]`."""
  n = volume.shape[0] // crop
  v = volume[:n * crop, :n * crop, :n * crop]
  v = v.reshape(n, crop, n, crop, n, crop, -1).transpose(0, 2, 4, 1, 3, 5, 6)
  return v.reshape(n ** 3, crop, crop, crop, -1)


def train_and_predict(variant: str, kind: str, seed: int, workdir: str) -> None:
  """One run: train (or resume), then predict every held-out universe."""
  from absl import logging  # noqa: PLC0415
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would drown the progress
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from experiments.trainers import cosmoflow  # noqa: PLC0415
  from sdl.data import synthetic  # noqa: PLC0415
  from sdl.data.cosmoflow import spec_of, universe_seeds  # noqa: PLC0415
  config = run_config(variant, kind, seed)
  state = cosmoflow.run(config, workdir)
  plan = cosmoflow.validate(config, jax.device_count())
  model = cosmoflow.build_model(config, plan, None)
  predict = jax.jit(lambda params, stats, x: model.apply({"params": params, **stats}, x))
  stats = {"batch_stats": state.model_state} if state.model_state else {}
  spec, crop = spec_of(config), settings(variant)["crop"]
  _, val_seeds = universe_seeds(config)
  whole = synthetic.make_dataset(val_seeds, spec, spec.size, 1, desc="held-out universes")
  preds = []
  for volume in whole.volumes:
    x = held_out_crops(volume, crop) if kind == "crops" else volume[None]
    preds.append(np.concatenate([np.asarray(predict(state.params, stats, x[i:i + 8]))
                                 for i in range(0, len(x), 8)]))
  tmp = os.path.join(workdir, "predictions.tmp.npz")
  np.savez(tmp, predictions=np.stack(preds), labels=whole.labels)
  os.replace(tmp, os.path.join(workdir, "predictions.npz"))


def child_env() -> dict:
  """The runs' environment: one CPU device each (a parent's virtual-device flag dropped)."""
  env = dict(os.environ)
  flags_ = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags_)
  return env


def summarise(variant: str, seeds: int, workdir: str) -> dict:
  import numpy as np  # noqa: PLC0415

  from sdl.bench.problems import cosmoflow_step_flops  # noqa: PLC0415
  from sdl.data import fisher, universes  # noqa: PLC0415
  from sdl.data.cosmoflow import universe_seeds  # noqa: PLC0415
  s = settings(variant)
  out = {"settings": s, "params": list(universes.PARAM_NAMES), "seeds": seeds}
  rows = {"single crop": [], "crop ensemble": [], "whole volume": []}
  for seed in range(seeds):
    crops = np.load(os.path.join(workdir, f"crops_{seed}", "predictions.npz"))
    whole = np.load(os.path.join(workdir, f"whole_{seed}", "predictions.npz"))
    y = crops["labels"]
    rows["single crop"].append(((crops["predictions"] - y[:, None]) ** 2).mean((0, 1)))
    rows["crop ensemble"].append(((crops["predictions"].mean(1) - y) ** 2).mean(0))
    rows["whole volume"].append(((whole["predictions"][:, 0] - y) ** 2).mean(0))
  out["mse"] = {k: np.mean(v, 0).tolist() for k, v in rows.items()}
  out["mse_std"] = {k: np.std(v, 0).tolist() for k, v in rows.items()}
  train_seeds, _ = universe_seeds(run_config(variant, "whole", 0))
  train_mean = np.mean([universes.scale_params(universes.sample_params(t)) for t in train_seeds], 0)
  out["mean_predictor"] = ((train_mean - y) ** 2).mean(0).tolist()  # the training labels' mean
  forecast = fisher.forecast(universes.UniverseSpec(size=s["universe"]))
  out["forecast"] = forecast.mse.tolist()
  out["forecast_with_prior"] = forecast.mse_with_prior.tolist()
  out["train_flops"] = {k: s["steps"] * cosmoflow_step_flops("mlperf", size, s["batch"])
                        for k, size in (("crops", s["crop"]), ("whole", s["universe"]))}
  return out


def table(r: dict) -> str:
  names = r["params"]
  lines = ["| predictor | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
  for k, v in r["mse"].items():
    sd = r["mse_std"][k]
    cells = [f"{m:.4f} ± {e:.4f}" for m, e in zip(v, sd)]
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {sum(v) / len(v):.4f} |")
  for k in ("forecast", "forecast_with_prior", "mean_predictor"):
    lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(f"{m:.4g}" for m in r[k]) + " | |")
  return "\n".join(lines)


def plot(workdir: str) -> str:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  crops = np.load(os.path.join(workdir, "crops_0", "predictions.npz"))
  whole = np.load(os.path.join(workdir, "whole_0", "predictions.npz"))
  y = crops["labels"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
  for ax, p, name in zip(axes, (0, 1), ("Ω_m", "σ_8")):
    for pred, label, marker in ((crops["predictions"][:, :, p], "single crops", "."),
                                (crops["predictions"][:, :, p].mean(1), "crop ensemble", "s"),
                                (whole["predictions"][:, 0, p], "whole volume", "o")):
      if pred.ndim == 2:
        ax.scatter(np.repeat(y[:, p], pred.shape[1]), pred.ravel(), s=3, alpha=0.3, label=label)
      else:
        ax.scatter(y[:, p], pred, marker=marker, s=18, label=label)
    ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
    ax.set(xlabel=f"true {name} (scaled)", ylabel="predicted", title=f"{name}, seed 0")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "predicted_vs_true.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  del argv
  variant, workdir = _VARIANT.value, _WORKDIR.value
  if _RUN.value:
    kind, seed = _RUN.value.split(":")
    train_and_predict(variant, kind, int(seed), os.path.join(workdir, f"{kind}_{seed}"))
    return
  os.makedirs(workdir, exist_ok=True)
  for seed in range(_SEEDS.value):
    for kind in INPUTS:
      if os.path.exists(os.path.join(workdir, f"{kind}_{seed}", "predictions.npz")):
        continue
      print(f"run {kind}, seed {seed} (resumes if interrupted) ...", flush=True)
      subprocess.run([sys.executable, "-m", "experiments.volume_scaling", f"--variant={variant}",
                      f"--workdir={workdir}", f"--run={kind}:{seed}"], check=True,
                     env=child_env())
  results = summarise(variant, _SEEDS.value, workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(table(results))
  print(f"wrote {plot(workdir)}")


if __name__ == "__main__":
  app.run(main)
