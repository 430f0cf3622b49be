r"""Segment your volume with a trained 3D U-Net: a class per voxel.

    python -m experiments.segment --volume=FILE.npy|DIR.zarr [--out=FILE.npy|DIR.zarr] \
        [--checkpoint=DIR] [--overlap=0.5] [--batch=2] [--nostandardize]

`--volume`: one volume, `[depth, height, width]` or `[depth, height, width, 1]`, any
integer or float dtype, as a `.npy` file or a zarr (v2 or v3) array. Any size: volumes
larger than the network's training crop are segmented window by window (`--window`,
default the crop size), windows overlapping by `--overlap` of their side, their class
probabilities blended (`sdl.train.segment`). The intensities are standardised (mean 0,
variance 1, as the training volumes are) unless `--nostandardize`.
`--out` (default: `<volume>.seg.npy`): uint8 classes `[depth, height, width]`, `.npy` or
zarr v3 (`.zarr`), plus a PNG of three orthogonal middle slices beside it (`.png`).
`--checkpoint`: a model directory (`model.json`, `params.npz`; default: the demo's model
shipped in `experiments/models/unet3d`) or a training workdir, exported on the fly;
`--export=DIR` writes a training workdir's model as such a directory and stops.
"""
import os

from absl import app, flags, logging

from experiments.trainers import entry

_VOLUME = flags.DEFINE_string("volume", None, "Volume to segment (.npy or zarr directory).")
_OUT = flags.DEFINE_string("out", None, "Classes to write (.npy or .zarr).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Model directory or training workdir (default: shipped).")
_EXPORT = flags.DEFINE_string("export", None, "Write --checkpoint's model here and stop.")
_WINDOW = flags.DEFINE_integer("window", None, "Window side (default: the training crop).")
_OVERLAP = flags.DEFINE_float("overlap", 0.5, "Overlap of neighbouring windows, [0, 1).")
_BATCH = flags.DEFINE_integer("batch", 2, "Windows per network call.")
_STANDARDIZE = flags.DEFINE_bool("standardize", True, "Scale to mean 0, variance 1 first.")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  from experiments.trainers import unet3d  # noqa: PLC0415
  from sdl.errors import UserError  # noqa: PLC0415
  try:
    model_dir = entry.model_directory(_CHECKPOINT.value or unet3d.SHIPPED, _EXPORT.value,
                                      unet3d.export)
    if model_dir is None:
      return
    if not _VOLUME.value:
      raise UserError("--volume=FILE: the volume to segment (.npy or zarr directory)")
    out = _OUT.value or os.path.splitext(_VOLUME.value.rstrip("/"))[0] + ".seg.npy"
    unet3d.segment_file(model_dir, _VOLUME.value, out, window=_WINDOW.value,
                        overlap=_OVERLAP.value, batch=_BATCH.value,
                        standardize=_STANDARDIZE.value)
  except UserError as error:
    entry.fail(str(error))


if __name__ == "__main__":
  app.run(main)
