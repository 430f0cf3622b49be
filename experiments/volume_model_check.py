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


def check(variant: str, size: int, batch: int, splits, params: str) -> list[dict]:
  """One row per P: XLA's and the model's bytes (see the module docstring)."""
  from experiments.trainers.memory import lowered_step  # noqa: PLC0415
  from sdl.bench import volume_model  # noqa: PLC0415
  from sdl.bench.hlo import collective_bytes  # noqa: PLC0415
  from sdl.bench.memory import footprint  # noqa: PLC0415

  stages, head = volume_model.cosmoflow_stages(variant, size)
  rows, copies = [], None
  for p in splits:
    plan, lowered = lowered_step(variant, size, batch, p, params=params)
    compiled = lowered.compile()
    total = footprint(compiled).total
    model_plan = volume_model.Plan(size, 4, batch, p, plan.spatial_layers, devices=p,
                                   fsdp=params == "fsdp")
    if copies is None:
      copies = volume_model.calibrate(stages, head, model_plan, total)
    predicted = volume_model.predict(stages, head, model_plan, copies)
    rows.append({"splits": p, "spatial_layers": plan.spatial_layers, "xla": total,
                 "model": predicted["total"], "copies": copies,
                 "halo_model": predicted["halo"],
                 "halo_hlo": collective_bytes(compiled.as_text(), "collective-permute")})
  return rows


def main(argv):
  del argv
  splits = [int(p) for p in _SPLITS.value]
  ensure_cpu_devices(max(splits))
  rows = check(_VARIANT.value, _SIZE.value, _BATCH.value, splits, _PARAMS.value)
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
