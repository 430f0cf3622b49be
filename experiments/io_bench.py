r"""Input pipeline benchmark: raw read throughput and exposed I/O in CosmoFlow training.

    python -m experiments.io_bench [--samples=32] [--steps=8] [--variant=mlperf]

1. Writes (once) a dataset of `--samples` 128³ x 4 synthetic universes to `--data`.
2. Raw reads: the sharded reader against `cat` and sequential `readinto`s of the same
   chunk files (`sdl.bench.io`), and the reader with its crc32c checks off (the check is
   one pass with the read: `sdl.kernels.checksum`). Targets:
   reader >= 0.7 x cat; verifying the checksums costs <= 10 % of the reader's throughput.
3. Exposed I/O: the same CosmoFlow training run (128³, batch 2, 1 x 2 data x spatial mesh)
   fed (a) from arrays already in memory and (b) from the dataset on disk with prefetch.
   Step times are measured per step (each step blocked on), first (compiling) and last
   (evaluating) steps excluded. Target: (b) median within 5 % of (a).
Prints a markdown table; results also go to `<workdir>/results.json`.
"""
import json
import os
import platform
import statistics
import time

from absl import app, flags, logging

from sdl.parallel import ensure_cpu_devices

_DATA = flags.DEFINE_string("data", "runs/io_bench/data", "Dataset directory (made if absent).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/io_bench", "Run directories and results.")
_SAMPLES = flags.DEFINE_integer("samples", 32, "Training samples (16 MiB each).")
_STEPS = flags.DEFINE_integer("steps", 8, "Training steps per input source.")
_VARIANT = flags.DEFINE_enum("variant", "mlperf", ["mlperf", "lbann"], "CosmoFlow network.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats of each raw read (median kept).")
_TRAINING = flags.DEFINE_bool("training", True, "Also run the exposed-I/O training comparison.")

SIZE, BATCH = 128, 2


def make_config(source: str, data: str):
  from experiments.configs.cosmoflow import get_config  # noqa: PLC0415
  c = get_config("default")
  c.model.variant = _VARIANT.value
  c.data.update(source=source, path=data, input_size=SIZE, universe_size=SIZE,
                train_universes=_SAMPLES.value, val_universes=BATCH, crops_per_universe=1)
  c.mesh.update(shape=(1, 2), cpu_devices=2)
  c.train.update(steps=_STEPS.value, batch_size=BATCH, log_every=_STEPS.value,
                 eval_every=10**6, checkpoint_every=10**6)
  return c


def train_step_times(config, workdir: str, datasets=None) -> dict:
  import jax  # noqa: PLC0415

  from experiments.trainers import cosmoflow  # noqa: PLC0415
  from sdl.train.metrics import read_jsonl  # noqa: PLC0415
  stamps = []

  def stamp(step, state):
    jax.block_until_ready(state.params)
    stamps.append(time.perf_counter())
  cosmoflow.run(config, workdir, datasets=datasets, hooks=[stamp])
  waited = sum(r.get("input_wait_s", 0) for r in read_jsonl(f"{workdir}/metrics.jsonl"))
  return {"step_s": [b - a for a, b in zip(stamps[:-2], stamps[1:-1])],  # steps 2 .. N-1
          "input_wait_s": waited}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  ensure_cpu_devices(2)
  import shutil  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from sdl.bench import io  # noqa: PLC0415
  from experiments.trainers import cosmoflow  # noqa: PLC0415
  from sdl.data import cosmoflow as cosmoflow_data  # noqa: PLC0415
  from sdl.data import store, synthetic  # noqa: PLC0415
  from sdl.parallel import make_mesh  # noqa: PLC0415

  data = _DATA.value
  config = make_config("disk", data)
  manifest = os.path.join(data, "train", store.MANIFEST)
  existing = os.path.exists(manifest) and store.open_dataset(os.path.join(data, "train")).raw
  if not existing or not existing.checksum:
    cosmoflow_data.write_datasets(config, data, overwrite=True)  # checksummed, the default
  plan = cosmoflow.validate(config, jax.device_count())
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes)
  compiled_shardings = cosmoflow.build(config, plan, mesh).batch_sharding
  train, val = cosmoflow_data.open_datasets(config)

  print(f"raw reads of {len(train)} samples ({_REPEATS.value} repeats, median) ...", flush=True)
  rates = io.throughput(train, compiled_shardings, BATCH, _REPEATS.value)

  results = {"rates_gb_s": rates}
  if not _TRAINING.value:
    report(results)
    return
  arrays = tuple(synthetic.ArrayDataset(d.read(slice(None)).result(), d.labels)
                 for d in (train, val))
  for label, source, datasets in (("memory arrays", "generate", arrays),
                                  ("disk + prefetch", "disk", None)):
    workdir = os.path.join(_WORKDIR.value, source)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"training from {label} ...", flush=True)
    results[label] = train_step_times(make_config(source, data), workdir, datasets)
  report(results)


def checksum_kind() -> str:
  from sdl.kernels import checksum  # noqa: PLC0415  (after the CPU devices are set)
  if checksum.available():
    return f"one pass in sdl/kernels/copycrc.cc ({checksum.kind()})"
  return "read, then the crc32c package (no C++ compiler for sdl/kernels/copycrc.cc)"


def report(results: dict) -> None:
  rates = results["rates_gb_s"]
  lines = [
      f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
      f"{time.strftime('%Y-%m-%d')}",
      f"crc32c check: {checksum_kind()}",
      "",
      "| raw read (same bytes) | GB/s | reader / method |",
      "|---|---|---|",
      *(f"| {k} | {rates[k]:.2f} | {rates['reader'] / rates[k]:.2f} |"
        for k in ("reader", "reader, checksums not verified", "reader, through tensorstore",
                  "cat", "readinto", "readinto, 16-byte aligned") if k in rates),
  ]
  if "memory arrays" in results:
    runs = [results[k] for k in ("memory arrays", "disk + prefetch")]
    a, b = (statistics.median(r["step_s"]) for r in runs)
    wait = [r["input_wait_s"] for r in runs]
    lines += [
        "",
        f"| CosmoFlow {_VARIANT.value} 128³, batch 2, mesh 1x2 | memory arrays | "
        "disk + prefetch | disk / memory |",
        "|---|---|---|---|",
        f"| median step (s) | {a:.3f} | {b:.3f} | {b / a:.3f} |",
        f"| input wait, all {_STEPS.value} steps (s) | {wait[0]:.3f} | {wait[1]:.3f} | |",
    ]
  print("\n".join(lines))
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
