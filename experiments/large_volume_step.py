"""One lbann CosmoFlow training step on a large volume under each memory plan.

    python -m experiments.large_volume_step [--sizes=128,256] \
        [--large=16:float32,8:float32] [--steps=2] [--out=runs/large_volume_step.jsonl] \
        [--compile_only]

Sweeps, at each of `--sizes`, the stem's plan (`sdl.models.slabs`: none; the first two conv +
pool blocks rematerialised as one; in 4 or 16 depth slabs; or, per layer, `model.remat`
blocks under their policies, `REMAT_BLOCKS`) × precision (float32; bfloat16 compute;
float32 compute with the convolutions' inputs kept in bfloat16 for the backward pass) ×
spatial split (1, 2 virtual devices), and at 512³ the `--large` points (slabs:precision),
plus the plain step at 512³ compiled only (it does not fit). Each point runs in its own
process, so that its peak RSS is its own, and prints:

* the step's memory: XLA's buffer assignment per device (arguments + outputs − aliased +
  temporaries, `sdl.bench.memory.footprint`) and the process's peak RSS (compile included);
* its time: the median of `--steps` timed steps after one untimed step (at 512³, one timed
  step and no untimed one: a step there takes a minute);
* its FLOPs, counted (`sdl.bench.problems.cosmoflow_executed_flops`: the model's, plus the
  stem's recomputation and slab halos, which XLA's cost analysis does not see inside sdl's
  custom-call kernels), and the rate they ran at.

Beside XLA's bytes, `sdl.bench.volume_model`'s prediction for the points without slabs
or rematerialisation (which it does not price), its one parameter read from the first
such float32 point on one device: the model extrapolated from a small volume to 512³.

The input is a random Poisson volume (the step's cost does not depend on the counts). Rows
are appended to `--out` as they finish; a rerun skips the points already there.
"""
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["128", "256"], "Volume sides to sweep.")
_LARGE = flags.DEFINE_list("large", ["16:float32", "8:float32", "16:bf16-saved"],
                           "512³ points as slabs:precision (float32, bfloat16 or bf16-saved; "
                           "'' for none).")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per point below 512³.")
_OUT = flags.DEFINE_string("out", "runs/large_volume_step.jsonl", "Results, one JSON per point.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile every point, run none: the memory columns only.")
_POINT = flags.DEFINE_string("point", "", "Internal: run this one point (JSON) and print it.")

GiB = 2 ** 30
STEM = 4  # lbann's first two conv + avg-pool blocks: the layers at full and half resolution
# compute in float32, keep the convolutions' inputs for the backward pass in bfloat16
SAVED_BF16 = "float32, bf16 saved"
# Rematerialised blocks of the stem's layers (`model.remat`), without slabs: each conv +
# pool its own block, recomputed whole; or the four as one block keeping the conv outputs.
REMAT_BLOCKS = {"per block, full": (("conv1", "avgpool1", "full"), ("conv2", "avgpool2", "full")),
                "save_convs": (("conv1", "avgpool2", "save_convs"),)}


def sweep_points(sizes, large) -> list[dict]:
  points = []
  for size in sizes:
    base = dict(size=size, slabs=1, slab_layers=0, remat=False, precision="float32", split=1)
    points += [base,
               {**base, "slab_layers": STEM, "remat": True},
               *({**base, "remat_blocks": name} for name in REMAT_BLOCKS),
               {**base, "slab_layers": STEM, "slabs": 4},
               {**base, "slab_layers": STEM, "slabs": 16},
               {**base, "precision": "bfloat16"},
               {**base, "slab_layers": STEM, "slabs": 4, "precision": "bfloat16"},
               {**base, "precision": SAVED_BF16},
               {**base, "slab_layers": STEM, "slabs": 4, "precision": SAVED_BF16},
               {**base, "split": 2}]
  points.append(dict(size=512, slabs=1, slab_layers=0, remat=False, precision="float32",
                     split=1, compile_only=True))
  for spec in filter(None, large):
    slabs, precision = spec.split(":")
    precision = SAVED_BF16 if precision == "bf16-saved" else precision
    points.append(dict(size=512, slabs=int(slabs), slab_layers=STEM, remat=True,
                       precision=precision, split=1))
  return points


def key(point: dict) -> str:
  return json.dumps({k: point[k] for k in sorted(point) if k in (
      "size", "slabs", "slab_layers", "remat", "remat_blocks", "precision", "split",
      "compile_only")})


def random_volume(size: int, seed: int = 0):
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  volume = np.empty((1, size, size, size, 4), np.int16)
  for c in range(4):  # one channel at a time: Poisson draws are int64
    volume[0, ..., c] = rng.poisson(4.0, size=(size,) * 3)
  return volume


def run_point(point: dict) -> dict:
  """Build, compile and time the step of `point` in this process."""
  from sdl.parallel import ensure_cpu_devices  # noqa: PLC0415
  ensure_cpu_devices(point["split"])
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from experiments.configs.cosmoflow import get_config  # noqa: PLC0415
  from experiments.trainers import cosmoflow  # noqa: PLC0415
  from sdl.bench.memory import footprint  # noqa: PLC0415
  from sdl.bench.problems import cosmoflow_executed_flops  # noqa: PLC0415
  from sdl.parallel import make_mesh  # noqa: PLC0415

  size = point["size"]
  config = get_config("one_box")
  config.data.update(input_size=size, universe_size=size)
  config.model.update(slab_layers=point["slab_layers"], slabs=point["slabs"],
                      stem_remat=point["remat"] and point["slabs"] == 1,
                      remat=REMAT_BLOCKS.get(point.get("remat_blocks"), ()),
                      slab_progress=False)
  if point["precision"] == SAVED_BF16:
    config.model.update(compute_dtype="float32", save_dtype="bfloat16")
  else:
    config.model.update(compute_dtype=point["precision"])
  config.mesh.update(shape=(1, point["split"]), cpu_devices=point["split"])
  plan = cosmoflow.validate(config, point["split"])
  mesh = make_mesh(plan.mesh_shape, plan.mesh_axes, devices=jax.devices()[:point["split"]])
  c = cosmoflow.build(config, plan, mesh)
  start = time.perf_counter()
  compiled = c.train_step.lower(c.abstract_state, cosmoflow.abstract_batch(
      config, c.batch_sharding), None).compile()
  fp = footprint(compiled)
  out = {**point, "xla_gib": fp.total / GiB, "spatial_layers": plan.spatial_layers, "compile_s": time.perf_counter() - start,
         "flops": cosmoflow_executed_flops("lbann", size, 1, point["slab_layers"],
                                           point["slabs"], point["remat"],
                                           config.model.remat)}
  if not point.get("compile_only"):
    state = c.init_state()
    batch = {"volume": jax.device_put(random_volume(size), c.batch_sharding["volume"]),
             "label": jax.device_put(np.zeros((1, 4), np.float32), c.batch_sharding["label"])}
    steps = 1 if size >= 512 else _STEPS.value
    times = []
    for i in range(steps + (size < 512)):
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      if i or size >= 512:
        times.append(time.perf_counter() - t)
    out["step_s"] = float(np.median(times))
    out["gflops_per_s"] = out["flops"] / out["step_s"] / 1e9
  out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
  return out


def volume_model_gib(row: dict, calibration: dict | None) -> tuple[float | None, dict | None]:
  """(the volume model's GiB per device for `row`, or None where it does not apply; the
  calibration row, `row` itself if it is the first plain float32 point on one device)."""
  from sdl.bench import volume_model  # noqa: PLC0415
  if (row["slab_layers"] or row.get("remat_blocks")
      or row["precision"] not in ("float32", "bfloat16")):
    return None, calibration
  if calibration is None and row["split"] == 1 and row["precision"] == "float32":
    calibration = row
  if calibration is None:
    return None, calibration

  def plan(r):
    return volume_model.Plan(r["size"], 4, 1, r["split"], r.get("spatial_layers", 0),
                             devices=r["split"], state_copies=3,  # SGD with momentum
                             dtype_bytes=4 if r["precision"] == "float32" else 2)
  stages, head = volume_model.cosmoflow_stages("lbann", row["size"])
  cal_stages, cal_head = volume_model.cosmoflow_stages("lbann", calibration["size"])
  copies = volume_model.calibrate(cal_stages, cal_head, plan(calibration),
                                  calibration["xla_gib"] * GiB)
  return volume_model.predict(stages, head, plan(row), copies)["total"] / GiB, calibration


def describe(p: dict) -> str:
  stem = (f"remat {p['remat_blocks']}" if p.get("remat_blocks") else
          "none" if not p["slab_layers"] else
          f"{p['slabs']} slabs" if p["slabs"] > 1 else "remat, whole")
  return f"| {p['size']}³ | {stem} | {p['precision']} | {p['split']} |"


def main(argv):
  del argv
  if _POINT.value:
    print("RESULT " + json.dumps(run_point(json.loads(_POINT.value))), flush=True)
    return
  done = {}
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      done = {key(r): r for r in map(json.loads, f)}
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  points = sweep_points([int(s) for s in _SIZES.value if s], _LARGE.value)
  if _COMPILE_ONLY.value:
    points = [{**p, "compile_only": True} for p in points]
  print("| size | stem | precision | spatial split | XLA GiB/device | volume model GiB | "
        "peak RSS GiB | s/step | TFLOP/step | GFLOP/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|", flush=True)
  calibration = None
  for i, point in enumerate(points, 1):
    row = done.get(key(point))
    if row is None:
      print(f"  point {i}/{len(points)}: {key(point)} ...", file=sys.stderr, flush=True)
      proc = subprocess.run([sys.executable, "-m", "experiments.large_volume_step",
                             f"--point={json.dumps(point)}"], capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"{describe(point)} failed (exit {proc.returncode}): {' / '.join(tail)}",
              flush=True)
        continue
      row = json.loads(lines[-1][len("RESULT "):])
      with open(_OUT.value, "a") as f:
        f.write(json.dumps(row) + "\n")
    step = (f"{row['step_s']:.2f}" if "step_s" in row else "compiled only")
    rate = f"{row['gflops_per_s']:.0f}" if "gflops_per_s" in row else "—"
    model, calibration = volume_model_gib(row, calibration)
    model = "—" if model is None else f"{model:.2f}" + (" (read)" if row is calibration else "")
    print(f"{describe(row)} {row['xla_gib']:.2f} | {model} | {row['peak_rss_gib']:.2f} | "
          f"{step} | "
          f"{row['flops'] / 1e12:.3f} | {rate} |", flush=True)


if __name__ == "__main__":
  app.run(main)
