"""The K-FAC study end to end (smoke variants), and the image-folder reader."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image  # matplotlib's dependency: writes the test images, decodes the reference

from experiments.configs import kfac as kfac_configs
from sdl.data import image_folder
from sdl.optim import kfac
from experiments.trainers import kfac_compare


def test_digits_autoencoder_study_writes_runs_summary_plots_and_resumes(tmp_path, capsys):
  config = kfac_configs.get_config("digits_autoencoder,smoke")
  summary = kfac_compare.compare(config, str(tmp_path))
  for name in ("summary.json", "summary.md", "loss_vs_steps.png", "loss_vs_seconds.png"):
    assert os.path.getsize(tmp_path / name) > 0
  runs = sorted(os.listdir(tmp_path / "runs"))
  assert runs == ["adam_lr0.01.json", "kfac_lr0.3.json", "sgd_lr0.1.json"]
  with open(tmp_path / "runs" / "kfac_lr0.3.json") as f:
    history = json.load(f)["history"]
  assert [h["step"] for h in history] == [0, 3, 6]
  assert history[-1]["loss"] < history[0]["loss"]
  assert set(summary["best"]) == {"kfac", "sgd", "adam"}
  capsys.readouterr()
  kfac_compare.compare(config, str(tmp_path))  # a rerun finds every run done
  assert capsys.readouterr().out.count("done earlier") == 3


def test_summary_ratios_against_the_best_first_order_run():
  config = kfac_configs.get_config("digits_autoencoder,smoke")
  config.train.target_loss = 0.5
  run = lambda name, lr, losses, step_s: {
      "optimizer": name, "lr": lr, "step_s_median": step_s, "compile_s": 1.0,
      "history": [{"step": 10 * i, "seconds": 10 * i * step_s, "loss": v}
                  for i, v in enumerate(losses)]}
  runs = [run("kfac", 1.0, [0.9, 0.6, 0.4], 0.02),
          run("sgd", 0.1, [0.9, 0.8, 0.7, 0.6, 0.45], 0.01),
          run("sgd", 0.3, [0.9, 0.8, float("nan")], 0.01),
          run("adam", 0.01, [0.9, 0.7, 0.6, 0.49], 0.01)]
  s = kfac_compare.summarize(config, runs)
  assert s["best"]["adam"]["steps"] == 30 and s["best"]["sgd"]["steps"] == 40
  r = s["kfac_vs_best_first_order"]
  assert r["steps_ratio"] == pytest.approx(20 / 30)
  assert r["seconds_ratio"] == pytest.approx(0.4 / 0.3)
  assert r["step_time_vs_sgd"] == pytest.approx(2.0)
  assert "met before training" not in s["table"]
  config.train.target_loss = 0.95  # every run starts below it: no ratio, and a hint
  s = kfac_compare.summarize(config, runs)
  assert s["kfac_vs_best_first_order"]["steps_ratio"] is None
  assert "met before training (initial loss 0.9000" in s["table"]


def write_folder(root, sizes_per_class):
  rng = np.random.default_rng(0)
  for c, sizes in enumerate(sizes_per_class):
    os.makedirs(root / f"class{c}")
    for i, (h, w, kind) in enumerate(sizes):
      pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
      if kind == "gray":
        Image.fromarray(pixels[..., 0]).save(root / f"class{c}" / f"{i}.png")
      else:
        Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.{kind}", quality=95)


def test_image_folder_decodes_like_pil_and_resizes_like_jax(tmp_path):
  write_folder(tmp_path, [[(40, 48, "jpg"), (30, 20, "gray")], [(64, 36, "png")]])
  folder = image_folder.ImageFolder.scan(str(tmp_path))
  assert folder.classes == ("class0", "class1")
  assert list(folder.labels) == [0, 0, 1]
  batch = folder.read([0, 1, 2], size=24, resize=28)
  assert batch["x"].shape == (3, 24, 24, 3) and list(batch["y"]) == [0, 0, 1]
  for k, path in enumerate(folder.files):
    ref = np.asarray(Image.open(path).convert("RGB"), np.float32)
    h, w = ref.shape[:2]
    scale = 28 / min(h, w)
    shape = (max(28, round(h * scale)), max(28, round(w * scale)), 3)
    resized = np.asarray(jax.image.resize(jnp.asarray(ref), shape, "linear", antialias=False))
    want = (image_folder.center_crop(resized, 24) / 255.0 - image_folder.MEAN) / image_folder.STD
    # PNG is lossless; JPEG decoders may differ by a grey level here and there.
    tol = 0.05 if path.endswith(".jpg") else 1e-4
    assert np.abs(batch["x"][k] - want).mean() < tol, path


def test_image_folder_errors_name_the_file(tmp_path):
  with pytest.raises(image_folder.ImageFolderError, match="not a directory"):
    image_folder.ImageFolder.scan(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty_class")
  with pytest.raises(image_folder.ImageFolderError, match="empty_class: no .jpg"):
    image_folder.ImageFolder.scan(str(tmp_path))
  os.rmdir(tmp_path / "empty_class")
  write_folder(tmp_path, [[(20, 20, "jpg")]])
  with open(tmp_path / "class0" / "broken.jpg", "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  folder = image_folder.ImageFolder.scan(str(tmp_path))
  with pytest.raises(image_folder.ImageFolderError, match="broken.jpg: cannot decode"):
    folder.read([0, 1], size=16, resize=16)


def test_resnet_problem_on_a_tiny_folder_factors_every_conv(tmp_path):
  data = tmp_path / "imagenet"
  write_folder(data / "train", [[(40, 44, "jpg")] * 4, [(36, 50, "jpg")] * 4,
                                [(48, 48, "png")] * 4])
  config = kfac_configs.get_config("resnet50_imagenet,smoke")
  config.data.path = str(data)
  config.optimizers = ("kfac",)
  problem = kfac_compare.make_problem(config)
  layers = kfac.find_layers(problem.model, problem.example)
  params = problem.model.init(jax.random.key(0), problem.example)["params"]
  kernels = [p for p in jax.tree_util.tree_leaves_with_path(params)
             if p[0][-1].key == "kernel"]
  assert len(layers) == len(kernels) == 1 + 4 * 4 + 1  # stem, 4 blocks (3 convs + proj), fc
  assert problem.eval_batch["x"].shape == (8, 32, 32, 3)
  config.train.update(steps=3, eval_every=3)
  run = kfac_compare.train_one(config, problem, "kfac", 0.3, progress=False)
  assert [h["step"] for h in run["history"]] == [0, 3]
  assert all(np.isfinite(h["loss"]) for h in run["history"])


def test_image_folder_survives_many_batched_reads(tmp_path):
  """Regression: waiting on several tensorstore image opens from one thread deadlocked
  (tensorstore 0.1.86) within two batches of this folder; a hang here fails by timeout."""
  write_folder(tmp_path, [[(30, 40, "jpg"), (24, 24, "png"), (30, 20, "gray")]] * 3)
  script = (f"import numpy as np; from sdl.data.image_folder import ImageFolder\n"
            f"f = ImageFolder.scan({str(tmp_path)!r}); rng = np.random.default_rng(0)\n"
            f"for _ in range(200): f.read(rng.choice(len(f), 8, replace=False), 16, 20)\n"
            f"print('done')")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]


def test_digits_cnn_kfac_learns_in_a_few_steps():
  config = kfac_configs.get_config("digits_cnn,smoke")
  problem = kfac_compare.make_problem(config)
  assert len(kfac.find_layers(problem.model, problem.example)) == 4  # 2 convs, 2 dense
  run = kfac_compare.train_one(config, problem, "kfac", 0.3, progress=False)
  losses = [h["loss"] for h in run["history"]]
  assert losses[-1] < 0.8 * losses[0]  # cross-entropy from ~log(10) on all 1,437 images


def test_profile_whole_steps_by_kind_and_inversion_exponent():
  from experiments.trainers import kfac_profile
  config = kfac_configs.get_config("digits_autoencoder,smoke")
  config.kfac.update(stats_every=2, inverse_every=4)
  steps = kfac_profile.whole_steps(config, kfac_compare.make_problem(config), cycles=2)
  assert steps["sgd"] > 0 and steps["kfac"] > 0 and steps["cycles"] == 2
  assert set(steps["kfac_by_kind"]) == {"plain", "statistics", "inversion"}
  widths = [64, 128, 256, 512]
  assert kfac_profile.fit_exponent(widths, [3e-9 * w ** 2.5 for w in widths]) == (
      pytest.approx(2.5))


def test_jit_step_compiles_every_phase_ahead_so_timed_steps_never_trace():
  traces = []

  def fn(state, batch, phase=None):
    traces.append(phase)
    add = 1.0 + (2.0 if phase.stats else 0.0) + (4.0 if phase.inverse else 0.0)
    return state + add * batch, {"loss": state.sum()}

  step = kfac_compare.JitStep(fn, (2, 3))
  state, batch = jnp.zeros(3), jnp.ones(3)
  step.compile(state, batch)
  assert sorted(traces) == sorted({kfac.phase_at(i, 2, 3) for i in range(6)})  # 4 phases
  n = len(traces)
  expected = 0.0
  for i in range(12):
    state, _ = step(state, batch, i)
    phase = kfac.phase_at(i, 2, 3)
    expected += 1.0 + 2.0 * phase.stats + 4.0 * phase.inverse
  assert len(traces) == n  # no step traced or compiled again
  np.testing.assert_allclose(state, expected)
