"""The memory and halo model (`sdl.bench.volume_model`) against XLA, for choosing a mesh.

    python -m experiments.volume_model_check [--variant=lbann] [--size=128] [--batch=1] \
        [--splits=1,2,4,8] [--params=fsdp|replicated]

Compiles the CosmoFlow train step on a `1 x P` data x spatial mesh for each P (as
`experiments.cosmoflow_memory` does) and sets beside each other: XLA's per-device bytes
and the model's, the model's one parameter (`copies`) read at P = 1; and the bytes each
device sends in the step's collective-permutes (the halo exchanges) and the model's halo
bytes. Prints a markdown table.
"""
from absl import app, flags

from sdl.parallel import ensure_cpu_devices

_VARIANT = flags.DEFINE_enum("variant", "lbann", ["lbann", "mlperf"], "CosmoFlow network.")
_SIZE = flags.DEFINE_integer("size", 128, "Input side in voxels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size (one data shard).")
_SPLITS = flags.DEFINE_list("splits", ["1", "2", "4", "8"], "Depth splits P.")
_PARAMS = flags.DEFINE_enum("params", "fsdp", ["replicated", "fsdp"], "mesh.params")


def main(argv):
  del argv
  splits = [int(p) for p in _SPLITS.value]
  ensure_cpu_devices(max(splits))
  from experiments.trainers.memory import volume_model_rows  # noqa: PLC0415
  rows = volume_model_rows(_VARIANT.value, _SIZE.value, _BATCH.value, splits, _PARAMS.value)
  mib = lambda b: f"{b / 2 ** 20:,.1f}"
  print(f"CosmoFlow {_VARIANT.value} {_SIZE.value}³ x 4, batch {_BATCH.value}, params "
        f"{_PARAMS.value}; the model's copies = {rows[0]['copies']:.2f} (read at P = 1)\n")
  print("| P | depth-split layers | XLA (MiB) | model (MiB) | model / XLA | halo, HLO "
        "collective-permutes (MiB) | halo, model (MiB) | model / HLO |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    halo = (f"{r['halo_model'] / r['halo_hlo']:.2f}" if r["halo_hlo"] else
            "—" if not r["halo_model"] else "no permutes")
    print(f"| {r['splits']} | {r['spatial_layers']} | {mib(r['xla'])} | {mib(r['model'])} | "
          f"{r['model'] / r['xla']:.2f} | {mib(r['halo_hlo'])} | {mib(r['halo_model'])} | "
          f"{halo} |")


if __name__ == "__main__":
  app.run(main)
