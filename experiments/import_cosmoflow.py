r"""Import MLPerf HPC CosmoFlow data (HDF5 universes or numpy pairs) as an sdl dataset.

    python -m experiments.import_cosmoflow --train=cosmoUniverse_2019_05_4parE/train \
        --val=cosmoUniverse_2019_05_4parE/validation --crop=128 --out=data/mlperf

then train with `--config.data.source=disk --config.data.path=data/mlperf` (or `memory`)
and `--config.data.input_size=128`. HDF5 input needs `pip install 'sdl[mlperf]'` (h5py).
"""
import os

from absl import app, flags

from sdl.data.mlperf import import_cosmoflow

_TRAIN = flags.DEFINE_string("train", None, "Directory (or file) of training inputs.",
                             required=True)
_VAL = flags.DEFINE_string("val", None, "Directory (or file) of validation inputs.",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "Dataset directory to create (train/, val/).",
                           required=True)
_CROP = flags.DEFINE_integer("crop", None, "Cut each volume into cubes of this side.")
_WORKERS = flags.DEFINE_integer("workers", 4, "Files read in parallel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")


def main(argv):
  del argv
  for split, root in (("train", _TRAIN.value), ("val", _VAL.value)):
    path = import_cosmoflow(root, os.path.join(_OUT.value, split), crop=_CROP.value,
                            workers=_WORKERS.value, overwrite=_OVERWRITE.value)
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
