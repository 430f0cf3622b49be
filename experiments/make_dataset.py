r"""Write the synthetic data of a config to disk, as `train/` and `val/` datasets.

    python -m experiments.make_dataset --config=experiments/configs/cosmoflow.py:demo \
        --out=data/demo
    python -m experiments.make_dataset --config=experiments/configs/unet3d.py:demo \
        --out=data/unet3d

The config file's name picks the trainer whose data it writes (`cosmoflow`: int16
universes and their 4 parameters; `unet3d`: float32 segmentation volumes and a uint8
class per voxel). The samples are exactly those that `data.source="generate"` makes in
memory (same seeds, same crops, same order), so a run can switch to
`--config.data.source=disk --config.data.path=data/demo --config.data.augment=False` (or
`memory`) and see the same batches. Samples are generated and streamed to disk; a
progress line shows how far it got. Nothing is visible at `--out` until a split is
complete (see `sdl.data.store`).
"""
import importlib
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/cosmoflow.py:demo", "Config whose data to write.")
_OUT = flags.DEFINE_string("out", None, "Dataset directory to create.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")
_CHECKSUM = flags.DEFINE_bool("checksum", True,
                               "crc32c per chunk, verified on every read (--nochecksum: off).")
WRITERS = {"cosmoflow": "sdl.data.cosmoflow", "unet3d": "experiments.trainers.unet3d"}


def main(argv):
  del argv
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  kind = os.path.splitext(os.path.basename(filename.split(":")[0]))[0]
  if kind not in WRITERS:
    raise app.UsageError(f"--config={filename}: writes the data of {sorted(WRITERS)} "
                         "configs only")
  write_datasets = importlib.import_module(WRITERS[kind]).write_datasets
  for path in write_datasets(_CONFIG.value, _OUT.value, overwrite=_OVERWRITE.value,
                             checksum=_CHECKSUM.value):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
