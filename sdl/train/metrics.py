"""Metrics on disk (`metrics.jsonl`) and on the terminal (a progress line).

Only process 0 writes. On resume, records past the restored step are dropped so that the
file reads as one uninterrupted run.
"""
import datetime
import json
import os
import sys
import time

import jax


def is_writer() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if is_writer() and os.path.exists(self.path):
      kept = [line for line in read_jsonl(self.path) if line["step"] <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    if is_writer():
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """`step 40/200 | loss 0.1234 | 3.21 steps/s | ETA 0:00:50` lines, plus compile time."""

  def __init__(self, total_steps: int, start_step: int, stream=sys.stdout,
               shown: tuple[str, ...] = ("loss", "lr")):
    self.total, self.stream, self.shown = total_steps, stream, shown
    self.last_step, self.last_time = start_step, time.perf_counter()

  def restart(self, step: int) -> None:
    """Measure rates from now on (after the first step, so the ETA leaves out its compile)."""
    self.last_step, self.last_time = step, time.perf_counter()

  def rate(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def line(self, step: int, rate: float, metrics: dict) -> None:
    if not is_writer():
      return
    eta = datetime.timedelta(seconds=round((self.total - step) / rate)) if rate > 0 else "?"
    shown = " | ".join(f"{k} {metrics[k]:.4g}" for k in self.shown if k in metrics)
    print(f"step {step}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {eta}",
          file=self.stream, flush=True)
