"""Segmenting a user's volume: the sliding window against a pointwise function of the whole
volume, the volume files (npy, zarr v2 and v3) and their errors, and the command with the
shipped model against the generator's ground truth."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from sdl.data import segmentation, volume_io
from sdl.errors import DataError
from sdl.train.segment import EDGE_WEIGHT, blend_weights, sliding_window, window_starts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("size,window,stride,want", [
    (32, 32, 16, [0]), (20, 32, 16, [0]), (48, 32, 16, [0, 16]), (50, 32, 16, [0, 16, 18]),
    (10, 4, 4, [0, 4, 6]), (9, 4, 1, [0, 1, 2, 3, 4, 5])])
def test_window_starts_cover_the_axis_and_end_flush(size, window, stride, want):
  starts = window_starts(size, window, stride)
  assert starts == want
  covered = np.zeros(max(size, window), bool)
  for s in starts:
    covered[s:s + window] = True
  assert covered.all()


def test_blend_weights_are_a_separable_tent():
  w = blend_weights(5)
  ramp = np.array([EDGE_WEIGHT, (1 + EDGE_WEIGHT) / 2, 1, (1 + EDGE_WEIGHT) / 2, EDGE_WEIGHT])
  np.testing.assert_allclose(w, np.einsum("i,j,k->ijk", ramp, ramp, ramp), rtol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_sliding_window_of_a_pointwise_function_is_that_function(batch):
  """Windows overlap, the last ones sit flush, the width is thinner than the window (padded
  and cropped), the last call is partly filler: every voxel still gets f(its value)."""
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(11, 20, 7, 1)).astype(np.float32)
  f = lambda x: np.concatenate([np.tanh(x), x ** 2, np.ones_like(x)], -1)
  calls = []

  def predict(x):
    assert x.shape == (batch, 8, 8, 8, 1)
    calls.append(1)
    return f(x)
  done = []
  out = sliding_window(volume, predict, 8, 5, batch, progress=lambda d, t: done.append((d, t)))
  np.testing.assert_allclose(out, f(volume), rtol=1e-5, atol=1e-6)
  windows = len(window_starts(11, 8, 5)) * len(window_starts(20, 8, 5))
  assert len(calls) == -(-windows // batch) and done[-1] == (len(calls), len(calls))


def test_sliding_window_weights_the_deepest_window_most():
  """A predictor that says 1 where the voxel is in the window's first half along depth and
  0 elsewhere: at the volume's middle plane both windows cover, the blend is the tent
  weights' ratio, not the plain mean."""
  volume = np.zeros((12, 8, 8, 1), np.float32)
  first = lambda x: np.broadcast_to((np.arange(8) < 4)[None, :, None, None, None],
                                    x.shape).astype(np.float32)
  out = sliding_window(volume, first, 8, 4, 1)[:, 0, 0, 0]
  ramp = blend_weights(8)[:, 0, 0] / blend_weights(8)[0, 0, 0]
  # planes 4..7: window 0 (positions 4..7, second half: 0) and window 4 (positions 0..3: 1)
  want = ramp[:4] / (ramp[4:] + ramp[:4])
  np.testing.assert_allclose(out[4:8], want, rtol=1e-6)
  np.testing.assert_array_equal(out[:4], 1)
  np.testing.assert_array_equal(out[8:], 0)


def write_zarr(path, array, driver):
  """`array` as a zarr v2 ("zarr") or v3 ("zarr3") array, in chunks of 4 per axis."""
  metadata = ({"shape": list(array.shape), "chunks": [4] * array.ndim, "dtype": array.dtype.str}
              if driver == "zarr" else
              {"shape": list(array.shape), "data_type": array.dtype.name, "chunk_grid": {
                  "name": "regular", "configuration": {"chunk_shape": [4] * array.ndim}}})
  store = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path)},
                   "metadata": metadata, "create": True}).result()
  store.write(array).result()


@pytest.mark.parametrize("form", ["npy", "npy4", "zarr", "zarr3"])
def test_volumes_read_from_each_format(tmp_path, form):
  raw = np.random.default_rng(1).integers(-300, 300, (6, 5, 4)).astype(np.int16)
  path = tmp_path / f"v.{'npy' if form.startswith('npy') else 'zarr'}"
  if form == "npy":
    np.save(path, raw)
  elif form == "npy4":
    np.save(path, raw[..., None])
  else:
    write_zarr(path, raw, form)
  volume = volume_io.read_volume(str(path))
  assert volume.dtype == np.float32 and volume.shape == (6, 5, 4, 1)
  np.testing.assert_array_equal(volume[..., 0], raw)


@pytest.mark.parametrize("array,name,message", [
    (np.zeros((4, 4)), "v.npy", r"shape \[4, 4\]; expected \[depth, height, width\]"),
    (np.zeros((4, 4, 4, 3)), "v.npy", "has 3 channels, the model takes 1; .*moveaxis"),
    (np.zeros((4, 4, 4), np.complex64), "v.npy", "dtype complex64 is not a number type"),
    (np.zeros((4, 4, 4), bool), "v.npy", "dtype bool is not a number type"),
    (np.full((4, 4, 4), np.nan), "v.npy", r"64 NaN or infinite values \(the first at voxel "
                                          r"\[0, 0, 0\]\)"),
    (np.zeros((4, 4, 4)), "v.txt", "expected a .npy file or a zarr array directory"),
    (None, "missing.npy", "no such file or directory"),
])
def test_bad_volumes_are_refused_naming_the_file(tmp_path, array, name, message):
  path = tmp_path / name
  if array is not None:
    with open(path, "wb") as f:
      np.save(f, array)
  with pytest.raises(DataError, match=message) as error:
    volume_io.read_volume(str(path))
  assert str(path) in str(error.value)


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_labels_written_and_replaced_atomically(tmp_path, suffix):
  labels = np.random.default_rng(2).integers(0, 3, (5, 6, 7)).astype(np.uint8)
  path = str(tmp_path / f"seg{suffix}")
  for value in (labels, labels[::-1].copy()):  # the second write replaces the first
    volume_io.write_labels(path, value)
    back = (np.load(path) if suffix == ".npy" else ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result().read().result())
    np.testing.assert_array_equal(back, value)
  assert sorted(os.listdir(tmp_path)) == [f"seg{suffix}"]  # no temporary left behind


def test_shipped_model_segments_a_volume_larger_than_its_windows(tmp_path):
  """The README's command on a generated 48³ volume (the model trained on 32³ crops; 8
  overlapping windows) finds the classes: Dice against the generator's labels."""
  image, labels = segmentation.volume(424242, segmentation.Spec(size=48, balls=6, rods=4))
  np.save(tmp_path / "vol.npy", (image[..., 0] * 50 + 1000).astype(np.int16))  # rescaled
  out = tmp_path / "seg.zarr"
  run = subprocess.run([sys.executable, "-m", "experiments.segment",
                        f"--volume={tmp_path / 'vol.npy'}", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  pred = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out)}}
                 ).result().read().result()
  assert pred.shape == labels.shape and pred.dtype == np.uint8
  dice = segmentation.dice(pred, labels, 3)
  assert dice.mean() >= 0.85, dice
  assert "segmenting: 4/4 network calls" in run.stderr
  assert os.path.getsize(tmp_path / "seg.png") > 1000

  bad = subprocess.run([sys.executable, "-m", "experiments.segment",
                        f"--volume={tmp_path / 'seg.png'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'seg.png'}: expected a .npy file or a zarr array directory "
      "(with zarr.json or .zarray)")
