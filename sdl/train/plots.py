"""Loss curves as a PNG next to `metrics.jsonl` (made by code, never by hand)."""
import os

from matplotlib.figure import Figure  # no pyplot: importing sdl leaves its state alone

from sdl.train.metrics import read_jsonl


def plot_metrics(workdir: str, train_keys=("loss",), eval_keys=("eval_loss",),
                 filename: str = "loss_curves.png") -> str:
  """Plot training and eval series from `workdir/metrics.jsonl`; returns the PNG path."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for keys, style in ((train_keys, "-"), (eval_keys, "o-")):
    for key in keys:
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        ax.plot(*zip(*points), style, label=key, markersize=4)
  ax.set_xlabel("step")
  ax.set_yscale("log")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, filename)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
