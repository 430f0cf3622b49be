"""The U-Net trainer: the smoke variant trains, is killed, resumes bit-identically; Dice
equals a direct set computation; the synthetic classes defeat any intensity threshold;
config errors name the field."""
import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import unet3d as configs
from experiments.trainers import unet3d as trainer
from sdl.data import segmentation
from sdl.errors import ConfigError
from sdl.parallel import make_mesh


class Crash(Exception):
  pass


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_smoke_trains_is_killed_and_resumes_bit_identically(tmp_path):
  config = configs.get_config("smoke")
  config.mesh.shape = (1, 8)  # the tests' 8 devices: down1 and up1 split, the rest data
  straight = trainer.run(config, str(tmp_path / "straight"))

  def crash_after_4(step, state):
    if step == 4:
      raise Crash
  workdir = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    trainer.run(config, workdir, hooks=[crash_after_4])
  resumed = trainer.run(config, workdir)
  for a, b in zip(jax.tree.leaves((resumed.params, resumed.model_state)),
                  jax.tree.leaves((straight.params, straight.model_state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.model_state["batch_stats"]  # BatchNorm statistics are part of the state
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["loss"] for r in records] == [
      r["loss"] for r in read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))]
  evals = [r for r in records if "eval_dice_mean" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for r in evals:
    dice = [r[f"eval_dice_{n}"] for n in segmentation.CLASS_NAMES]
    assert all(0 <= d <= 1 for d in dice)
    assert r["eval_dice_mean"] == pytest.approx(np.mean(dice))
  assert os.path.getsize(os.path.join(workdir, "slices.png")) > 1000
  check_export_and_segment(config, workdir, resumed, tmp_path)

  # The same volumes written to disk (float32, a uint8 class per voxel) train the same
  # model, read shard by shard (`data.source=disk`); held on the devices (`memory`), they
  # give the same batches.
  trainer.write_datasets(config, str(tmp_path / "data"))
  config.data.update(source="disk", path=str(tmp_path / "data"))
  from_disk = trainer.run(config, str(tmp_path / "disk"))
  for a, b in zip(jax.tree.leaves(from_disk.params), jax.tree.leaves(straight.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plan = trainer.validate(config, jax.device_count())
  shardings = trainer.build(config, plan, make_mesh(plan.mesh_shape, plan.mesh_axes)
                            ).batch_sharding
  indices = np.array([3, 0])
  config.data.source = "generate"
  want = trainer.make_sources(config, shardings)[0].batch(indices)
  config.data.source = "memory"
  got = trainer.make_sources(config, shardings)[0].batch(indices)
  for key in ("volume", "label"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
  config.data.crop_size = 8
  with pytest.raises(ConfigError, match=r"holds volumes \[16, 16, 16, 1\] and labels "
                     r"\[16, 16, 16\], but data.crop_size=8"):
    trainer.open_datasets(config)


def check_export_and_segment(config, workdir, state, tmp_path):
  """The exported model (float16 parameters and BatchNorm statistics) predicts as the
  trained state does on one device, and `experiments.segment` runs it window by window."""
  model_dir = trainer.export(workdir, str(tmp_path / "model"))
  predict, spec = trainer.load_exported(model_dir)
  assert spec["step"] == 6 and spec["crop_size"] == 16
  volume = trainer.volumes(config, "val")[0][:2]
  logits = trainer.build_model(config).apply(
      {"params": state.params, **state.model_state}, volume, train=False)
  want, got = np.asarray(jax.nn.softmax(logits, -1)), np.asarray(predict(volume))
  assert np.abs(got - want).max() < 2e-2
  assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.99

  np.save(tmp_path / "big.npy", np.concatenate([volume[0], volume[1]], 0)[:, :12])  # 32x12x16
  lines = []
  classes, _ = trainer.segment_file(model_dir, str(tmp_path / "big.npy"),
                                    str(tmp_path / "big.seg.npy"), window=16, overlap=0.5,
                                    log=lines.append)
  assert classes.shape == (32, 12, 16) and classes.dtype == np.uint8
  np.testing.assert_array_equal(np.load(tmp_path / "big.seg.npy"), classes)
  assert "-> " in lines[0] and os.path.exists(tmp_path / "big.seg.png")
  for kwargs, message in (({"window": 10}, "--window=10: must be a positive multiple of "
                                           r"2\^levels = 4"),
                          ({"overlap": 1.0}, r"--overlap=1.0: must be in \[0, 1\)"),
                          ({"out": "x.tif"}, "--out=x.tif: must end in .npy or .zarr")):
    args = {"out": str(tmp_path / "o.npy"), **kwargs}
    with pytest.raises(ConfigError, match=message):
      trainer.segment_file(model_dir, str(tmp_path / "big.npy"), args.pop("out"), **args)


def test_dice_equals_a_direct_set_computation():
  rng = np.random.default_rng(0)
  pred, truth = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
  for c, d in enumerate(segmentation.dice(pred, truth, 3)):
    p = {i for i in range(500) if pred[i] == c}
    t = {i for i in range(500) if truth[i] == c}
    assert d == pytest.approx(2 * len(p & t) / (len(p) + len(t)))
  assert segmentation.dice(np.zeros(4), np.zeros(4), 2)[1] == 1.0  # absent from both


def test_classes_share_one_intensity_distribution():
  """Mean 0 and variance 1 inside every class, and the best threshold pair of the
  intensity (every order of the classes) leaves the objects' mean Dice low."""
  spec = segmentation.Spec(size=32)
  image, labels = segmentation.dataset(range(4), spec)
  x = image[..., 0]
  for c in range(3):
    assert abs(x[labels == c].mean()) < 0.1 and abs(x[labels == c].std() - 1) < 0.1
  assert np.all(np.bincount(labels.ravel(), minlength=3) > 0.03 * labels.size)
  cuts = np.quantile(x, np.linspace(0.05, 0.95, 19))
  best = 0.0
  for lo in cuts:
    for hi in cuts[cuts > lo]:
      bins = np.digitize(x, [lo, hi])
      for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        pred = np.asarray(order)[bins]
        best = max(best, segmentation.dice(pred, labels, 3)[1:].mean())
  assert best < 0.5, best


@pytest.mark.parametrize("field,value,message", [
    ("model.classes", 4, "model.classes=4: the synthetic volumes have 3 classes"),
    ("model.norm", "layer", "model.norm='layer': choose one of"),
    ("model.class_weights", (1.0, 2.0), "model.class_weights has 2 entries"),
    ("data.crop_size", 10, "data.crop_size=10 must be divisible by 4"),
    ("model.layouts", "spatial,spatial,spatial,depth", "model.layouts has 4 entries for 5 blocks"),
    ("data.val_volumes", 1, "data.val_volumes=1 is smaller than train.batch_size=2"),
    ("data.source", "s3", "data.source='s3': choose one of"),
    ("data.source", "disk", "data.source='disk' reads data.path/train and data.path/val; "
                            "set data.path"),
])
def test_config_errors_name_the_field(field, value, message):
  config = configs.get_config("smoke")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    trainer.validate(config, 2)
