r"""Run the notebooks top to bottom, as shipped or with their tiny test settings.

    .venv/bin/python notebooks/run.py                  # every notebook, as shipped
    .venv/bin/python notebooks/run.py --tiny           # the settings the tests use
    .venv/bin/python notebooks/run.py data_pipeline    # some of them (names or paths)

Each notebook runs in a fresh kernel (nbclient, the `python3` kernel of this
environment) with the notebooks folder as its working directory; an error in any cell
stops it, prints the cell and the traceback, and makes the exit status 1. The executed
copies, with their outputs and plots, go to `--out` (default `runs/notebooks/`); the
committed notebooks stay without outputs (tests/test_notebooks.py checks that).

`--tiny` inserts the notebook's `TINY` settings (below) as a cell after its `parameters`
cell, the way papermill injects parameters, so a notebook reads its settings from one
place either way.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ("universes", "spatial_partitioning", "data_pipeline", "kfac_vs_adam",
             "layers_roofline", "betweenness", "diarization", "unet3d")
# What the test suite runs: the same cells on tiny problems, seconds each.
TINY = {
    "universes": {"size": 32, "seeds": 6},
    "spatial_partitioning": {"size": 32, "memory_size": 32, "memory_splits": (1, 2),
                             "memory_params": ("fsdp",)},
    "data_pipeline": {"universes": 2, "steps": 4, "read_latency_s": 0.05},
    "kfac_vs_adam": {"steps": 30, "profile_runs": 2, "inversion_widths": (32, 64)},
    "layers_roofline": {"suite_variant": "smoke", "runs": 2, "limit": 1},
    "betweenness": {"nodes": 400},
    "diarization": {"utterances": (2, 3)},
    "unet3d": {"size": 16, "segment_size": 40},
}
TIMEOUT_S = 600  # per cell


def path_of(name: str) -> str:
  if name.endswith(".ipynb"):
    return os.path.abspath(name)
  return os.path.join(HERE, f"{name}.ipynb")


def inject(nb, settings: dict) -> None:
  """Add a cell setting `settings` after the cell tagged `parameters`."""
  import nbformat  # noqa: PLC0415
  at = next((i for i, c in enumerate(nb.cells)
             if "parameters" in c.get("metadata", {}).get("tags", [])), None)
  if at is None:
    raise ValueError("the notebook has no cell tagged 'parameters'")
  source = "# Injected by notebooks/run.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in settings.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  cell["id"] = "injected"
  nb.cells.insert(at + 1, cell)


def execute(path: str, settings: dict | None = None, out: str | None = None,
            env: dict | None = None) -> tuple[object, float]:
  """Run the notebook at `path` (with `settings` injected); returns the executed notebook
  and the seconds it took. Raises nbclient's CellExecutionError on an error."""
  import nbclient  # noqa: PLC0415
  import nbformat  # noqa: PLC0415
  nb = nbformat.read(path, as_version=4)
  if settings:
    inject(nb, settings)
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": HERE}})
  start = time.perf_counter()
  try:
    client.execute(**({"env": env} if env is not None else {}))  # the kernel's environment
  finally:
    seconds = time.perf_counter() - start
    if out:
      os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
      nbformat.write(nb, out)
  return nb, seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="notebooks (default: all)")
  parser.add_argument("--tiny", action="store_true", help="the tests' tiny settings")
  parser.add_argument("--out", default="runs/notebooks", help="executed copies go here")
  args = parser.parse_args(argv)
  import nbclient.exceptions  # noqa: PLC0415
  failed, times = [], {}
  for name in args.names or NOTEBOOKS:
    stem = os.path.splitext(os.path.basename(name))[0]
    settings = TINY.get(stem) if args.tiny else None
    out = os.path.join(args.out, f"{stem}.ipynb")
    print(f"{stem} ...", end=" ", flush=True)
    try:
      _, seconds = execute(path_of(name), settings, out)
    except nbclient.exceptions.CellExecutionError as error:
      print(f"failed (executed copy: {out})\n{error}", flush=True)
      failed.append(stem)
      continue
    times[stem] = round(seconds, 1)
    print(f"{seconds:.1f} s -> {out}", flush=True)
  print(json.dumps(times))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
