"""The crops-against-whole-volumes experiment, end to end on its smoke settings."""
import json
import os
import subprocess
import sys

import numpy as np

from experiments import volume_scaling
from sdl.data import universes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_held_out_crops_tile_the_universe():
  volume = np.random.default_rng(0).integers(0, 100, (64, 64, 64, 4))
  crops = volume_scaling.held_out_crops(volume, 32)
  assert crops.shape == (8, 32, 32, 32, 4)
  corners = [(d, h, w) for d in (0, 32) for h in (0, 32) for w in (0, 32)]
  for crop, (d, h, w) in zip(crops, corners):
    np.testing.assert_array_equal(crop, volume[d:d + 32, h:h + 32, w:w + 32])


def test_experiment_runs_resumes_and_scores_its_predictions(tmp_path):
  cmd = [sys.executable, "-m", "experiments.volume_scaling", "--variant=smoke", "--seeds=1",
         f"--workdir={tmp_path}"]
  first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "run crops, seed 0" in first.stdout and "run whole, seed 0" in first.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  crops = np.load(tmp_path / "crops_0" / "predictions.npz")
  whole = np.load(tmp_path / "whole_0" / "predictions.npz")
  settings = volume_scaling.settings("smoke")
  per_side = settings["universe"] // settings["crop"]
  assert crops["predictions"].shape == (settings["val_universes"], per_side ** 3, 4)
  assert whole["predictions"].shape == (settings["val_universes"], 1, 4)
  y = crops["labels"]
  np.testing.assert_array_equal(whole["labels"], y)  # the same held-out universes
  mse = lambda pred: ((pred - y) ** 2).mean(0)
  np.testing.assert_allclose(results["mse"]["crop ensemble"], mse(crops["predictions"].mean(1)),
                             rtol=1e-6)
  np.testing.assert_allclose(results["mse"]["whole volume"], mse(whole["predictions"][:, 0]),
                             rtol=1e-6)
  np.testing.assert_allclose(
      results["mse"]["single crop"],
      np.mean([mse(crops["predictions"][:, i]) for i in range(per_side ** 3)], 0), rtol=1e-6)
  # held-out labels are those of the universes' own parameters; the mean predictor uses the
  # training universes' (disjoint seeds)
  train_seeds = range(settings["train_universes"])
  mean = np.mean([universes.scale_params(universes.sample_params(s)) for s in train_seeds], 0)
  np.testing.assert_allclose(results["mean_predictor"], ((mean - y) ** 2).mean(0), rtol=1e-5)
  assert results["train_flops"]["whole"] > 8 * results["train_flops"]["crops"]
  assert (tmp_path / "predicted_vs_true.png").stat().st_size > 10_000
  # a second invocation finds every run done: no training, the same results
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "run crops" not in again.stdout
  assert json.loads((tmp_path / "results.json").read_text()) == results
