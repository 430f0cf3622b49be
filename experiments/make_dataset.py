r"""Write the synthetic CosmoFlow data of a config to disk, as `train/` and `val/` datasets.

    python -m experiments.make_dataset --config=experiments/configs/cosmoflow.py:demo \
        --out=data/demo

The samples are exactly those that `data.source="generate"` makes in memory (same seeds,
same crops, same order), so a run can switch to `--config.data.source=disk
--config.data.path=data/demo` (or `memory`) and see the same batches. Universes are
generated on parallel threads and streamed to disk; a progress line shows how far it got.
Nothing is visible at `--out` until a split is complete (see `sdl.data.store`).
"""
from absl import app, flags
from ml_collections import config_flags

from sdl.data.cosmoflow import write_datasets

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/cosmoflow.py:demo", "CosmoFlow config whose data to write.")
_OUT = flags.DEFINE_string("out", None, "Dataset directory to create.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")
_CHECKSUM = flags.DEFINE_bool("checksum", True,
                               "crc32c per chunk, verified on every read (--nochecksum: off).")


def main(argv):
  del argv
  config = _CONFIG.value
  for path in write_datasets(config, _OUT.value, overwrite=_OVERWRITE.value,
                             checksum=_CHECKSUM.value):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
