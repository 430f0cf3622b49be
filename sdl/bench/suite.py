"""The per-layer benchmark run: every problem x implementation x precision x pass.

`run(config, workdir)` times each cell (`sdl.bench.timing`; the implementations of one
problem, precision and pass in turns, so their ratios are side by side), counts its FLOPs
and bytes by hand (`sdl.bench.problems`) and cross-checks them against XLA's cost
analysis, measures the host's roofs (peak: the fastest JAX path on a large square GEMM;
bandwidth: a large copy), and writes `results.csv`, `results.md` (with a summary of the
large GEMMs) and a roofline PNG. Returns the markdown.
"""
import csv
import os
import platform
import time

import jax

from sdl import console
from sdl.bench import layers, problems, roofline
from sdl.bench.timing import measure_interleaved

CSV_COLUMNS = ["m", "n", "k", "a_t", "b_t", "precision", "time_usec", "tflops",
               "layer", "kind", "impl", "pass", "backend", "device", "flops", "bytes",
               "intensity", "gbytes_per_s", "spread", "runs", "xla_flops", "flops_diff_pct",
               "xla_bytes", "xla_custom_calls"]
BACKWARD_FACTOR = 3  # data gradient + weight gradient, each one forward's FLOPs
LARGE_GEMM_FLOPS = 1e10  # "large GEMM" in the summary: DeepBench's two biggest shapes
JAX_IMPLS = ("xla", "xla-blas")


def problem_list(p) -> list:
  limit = lambda xs: xs[:p.limit] if p.limit else xs  # noqa: E731
  out = []
  if p.gemm:
    out += limit(problems.deepbench_gemms())
  if p.get("dense", True):
    out += limit(problems.dense_layers(p.cosmoflow_size, p.cosmoflow_batch))
  if p.conv2d:
    out += limit(problems.deepbench_convs())
  if p.conv3d:
    for variant in ("mlperf", "lbann"):
      out += limit(problems.cosmoflow_convs(variant, p.cosmoflow_size, p.cosmoflow_batch))
    out += limit(problems.unet3d_convs(p.unet_size))
    out += limit(problems.unet3d_transposed_convs(p.unet_size))
  if p.transformer:
    for attention_only in (False, True):
      out.append(problems.Transformer(1, p.seq, p.width, p.heads, p.mlp, attention_only))
  if p.get("only"):  # rerun some rows: problems whose name contains the substring
    out = [x for x in out if p.only in x.name]
    if not out:
      raise ValueError(f"problems.only={p.only!r} matches no problem of this config")
  return out


def kind_of(problem) -> str:
  if isinstance(problem, problems.Gemm):
    return "gemm"
  if isinstance(problem, problems.Dense):
    return "dense"
  if isinstance(problem, problems.Conv):
    return f"conv{len(problem.spatial)}d"
  if isinstance(problem, problems.ConvTranspose):
    return "conv_transpose3d"
  return "attention" if problem.attention_only else "transformer"


def measure_peak(size: int, precision: str = "highest", impls=JAX_IMPLS, warmup: int = 2,
                 runs: int = 10) -> dict[str, float]:
  """FLOP/s of a `size`³ GEMM through each JAX path in `impls` that exists here ("xla",
  and "xla-blas" on CPU in fp32), timed in turns."""
  peak = problems.peak_gemm(size)
  built = {impl: b for impl in impls
           if (b := layers.build(peak, impl, precision, backward=False)) is not None}
  timings = measure_interleaved(list(built.values()), warmup=warmup, runs=runs)
  return {impl: peak.flops() / t.median_s for impl, t in zip(built, timings)}


def measure_roofs(config) -> roofline.Device:
  """Peak: the fastest JAX path (`xla`, and `xla-blas` where configured and available)
  on a large square fp32 GEMM. Bandwidth: a large copy."""
  impls = [i for i in JAX_IMPLS if i == "xla" or i in config.impls]
  rates = measure_peak(config.peak_gemm, "highest", impls, config.warmup,
                       max(5, config.runs // 2))
  best = max(rates, key=rates.get)
  bandwidth = layers.copy_bandwidth(config.copy_mib << 20)
  device = jax.devices()[0]
  each = ", ".join(f"{impl} {rate / 1e9:.1f}" for impl, rate in rates.items())
  peak = problems.peak_gemm(config.peak_gemm)
  return roofline.Device(f"this host ({device.device_kind}, {os.cpu_count()} cores)",
                         rates[best], bandwidth,
                         f"measured: {peak.name} fp32 through JAX, best of {each} GFLOP/s; "
                         f"copy of {config.copy_mib} MiB")


def run(config, workdir: str) -> str:
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  host = measure_roofs(config)
  print(f"roofs: {host.peak_flops / 1e9:.1f} GFLOP/s, {host.bandwidth / 1e9:.1f} GB/s",
        flush=True)
  precisions = [p for p in config.precisions
                if not (backend == "cpu" and p == "default")]  # default == fp32 on CPU
  rows = []
  todo = problem_list(config.problems)
  start = time.perf_counter()
  for i, problem in enumerate(todo, 1):
    for precision in precisions:
      for pass_ in config.passes:
        rows += measure_cell_group(problem, precision, pass_, config, backend, device)
    elapsed = time.perf_counter() - start
    console.progress(f"[{i}/{len(todo)}] {problem.name} ({elapsed:.0f} s)", final=i == len(todo))
  write_csv(os.path.join(workdir, "results.csv"), rows)
  points = [(f"{r['kind']} {r['layer']}", r["intensity"], r["tflops"] * 1e12) for r in rows
            if r["impl"] in ("xla", "xla-folded", "xla-blas") and r["precision"] == "highest"
            and r["pass"] == "forward"]
  png = roofline.plot(os.path.join(workdir, f"roofline_{backend}.png"), host, points,
                      f"{host.name}: fp32 forward, XLA")
  markdown = report(rows, host, png)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown)
  return markdown


def measure_cell_group(problem, precision: str, pass_: str, config, backend: str,
                       device: str) -> list[dict]:
  """Rows for every implementation of one (problem, precision, pass), timed in turns
  (`measure_interleaved`), so that their ratios are side by side."""
  backward = pass_ == "forward+backward"
  cells = {impl: b for impl in config.impls
           if (b := layers.build(problem, impl, precision, backward)) is not None}
  timings = measure_interleaved(list(cells.values()), warmup=config.warmup, runs=config.runs)
  rows = []
  for (impl, (fn, args)), timing in zip(cells.items(), timings):
    itemsize = 2 if precision == "bf16" else 4
    flops = problem.flops() * (BACKWARD_FACTOR if backward else 1)
    nbytes = problem.bytes(itemsize) * (BACKWARD_FACTOR if backward else 1)
    # XLA counts nothing inside a custom call (sdl's BLAS and direct convolution kernels):
    # no cross-check where the program makes one
    cost = layers.xla_cost(fn, args) if impl in ("xla", "xla-folded") else {}
    custom_calls = cost.get("custom_calls", "")
    xla_flops = None if custom_calls else cost.get("flops")
    g = problem if isinstance(problem, problems.Gemm) else None
    rows.append({
        "m": g.m if g else "", "n": g.n if g else "", "k": g.k if g else "",
        "a_t": int(g.a_t) if g else "", "b_t": int(g.b_t) if g else "",
        "precision": precision, "time_usec": timing.median_s * 1e6,
        "tflops": flops / timing.median_s / 1e12, "layer": problem.name,
        "kind": kind_of(problem), "impl": impl, "pass": pass_, "backend": backend,
        "device": device, "flops": flops, "bytes": nbytes,
        "intensity": flops / nbytes, "gbytes_per_s": nbytes / timing.median_s / 1e9,
        "spread": timing.spread, "runs": timing.runs,
        "xla_flops": xla_flops if xla_flops is not None else "",
        "flops_diff_pct": (100 * (xla_flops - flops) / flops) if xla_flops else "",
        "xla_bytes": "" if custom_calls else cost.get("bytes accessed", ""),
        "xla_custom_calls": custom_calls})
  return rows


def write_csv(path: str, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def report(rows: list[dict], host: roofline.Device, png: str) -> str:
  lines = [f"machine: {host.name}; {platform.python_version()}, jax {jax.__version__}; "
           f"{time.strftime('%Y-%m-%d')}",
           f"roofs ({host.note}): peak {host.peak_flops / 1e9:.1f} GFLOP/s, "
           f"bandwidth {host.bandwidth / 1e9:.1f} GB/s; plot: {png}", ""]
  lines += ["| layer | pass | impl | precision | time (µs) | GFLOP/s | % of peak | spread | "
            "XLA flops vs ours |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    diff = r["flops_diff_pct"]
    check = "" if diff == "" else (f"{diff:+.1f}%" + (" ≠" if abs(diff) > 1 else ""))
    if r.get("xla_custom_calls"):
      check = "custom call: not counted"
    lines.append(f"| {r['layer']} | {r['pass']} | {r['impl']} | {r['precision']} | "
                 f"{r['time_usec']:.0f} | {r['tflops'] * 1e3:.1f} | "
                 f"{100 * r['tflops'] * 1e12 / host.peak_flops:.0f} | {r['spread']:.2f} | "
                 f"{check} |")
  lines += large_gemm_summary(rows, host)
  devices = [host, roofline.A64FX, roofline.H100_FP32]
  lines += roofline_times(rows, devices)
  lines += ["", "| device | peak FLOP/s | bandwidth | ridge (FLOP/byte) | source |",
            "|---|---|---|---|---|"]
  for d in devices + [roofline.H100_BF16]:
    lines.append(f"| {d.name} | {d.peak_flops / 1e12:.2f} T | {d.bandwidth / 1e9:.0f} GB/s | "
                 f"{d.ridge:.1f} | {d.note} |")
  return "\n".join(lines) + "\n"


def large_gemm_summary(rows: list[dict], host: roofline.Device) -> list[str]:
  """Markdown lines: each large fp32 GEMM's best JAX rate against the peak and against
  the best rate any implementation reached on the same shape in this run."""
  large = [r for r in rows if r["kind"] == "gemm" and r["precision"] == "highest"
           and r["pass"] == "forward" and r["flops"] >= LARGE_GEMM_FLOPS]
  if not large:
    return []
  lines = ["", f"Large GEMMs (≥ {LARGE_GEMM_FLOPS:.0e} FLOP), forward fp32, GFLOP/s:", "",
           "| GEMM | best JAX path | JAX | best of all | best of all, by | JAX / peak | "
           "JAX / best of all |", "|---|---|---|---|---|---|---|"]
  for layer in dict.fromkeys(r["layer"] for r in large):
    cells = {r["impl"]: r["tflops"] * 1e12 for r in large if r["layer"] == layer}
    jax_impl = max((i for i in cells if i in JAX_IMPLS), key=cells.get, default=None)
    best = max(cells, key=cells.get)
    if jax_impl is None:
      continue
    lines.append(f"| {layer} | {jax_impl} | {cells[jax_impl] / 1e9:.1f} | "
                 f"{cells[best] / 1e9:.1f} | {best} | "
                 f"{100 * cells[jax_impl] / host.peak_flops:.0f} % | "
                 f"{100 * cells[jax_impl] / cells[best]:.0f} % |")
  return lines


def roofline_times(rows: list[dict], devices: list[roofline.Device]) -> list[str]:
  """Markdown lines: each layer's fp32 forward time, measured through its fastest JAX path
  (named), against the time the roofline predicts on each of `devices`."""
  fastest = {}
  for r in rows:
    if (r["impl"] in JAX_IMPLS + ("xla-folded",) and r["precision"] == "highest"
        and r["pass"] == "forward"):
      if r["layer"] not in fastest or r["time_usec"] < fastest[r["layer"]]["time_usec"]:
        fastest[r["layer"]] = r
  if not fastest:
    return []
  lines = ["", "Roofline-predicted forward time (µs, fp32) against the measured one (the "
           "fastest JAX path):", "",
           "| layer | JAX path | measured here | " + " | ".join(d.name for d in devices) + " |",
           "|---|---|---|" + "---|" * len(devices)]
  for layer, r in fastest.items():
    predicted = [1e6 * d.predicted_seconds(r["flops"], r["bytes"]) for d in devices]
    lines.append(f"| {layer} | {r['impl']} | {r['time_usec']:.0f} | "
                 + " | ".join(f"{p:.1f}" for p in predicted) + " |")
  return lines
