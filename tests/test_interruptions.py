"""A run killed with SIGKILL at seeded random points, or stopped with SIGTERM, resumes to
the same end as an uninterrupted run: the same parameters, and the same loss and eval
value in every record of `metrics.jsonl` (the metric window spans checkpoints here:
log_every=4, checkpoint_every=3). Real processes, as a scheduler would treat them."""
import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sdl.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
ARGS = ["--config=experiments/configs/digits.py:autoencoder_kfac,smoke",
        f"--config.train.steps={STEPS}", "--config.train.log_every=4",
        "--config.train.eval_every=8", "--config.train.checkpoint_every=3",
        "--config.mesh.cpu_devices=2"]


def launch(workdir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, "-u", "-m", "experiments.digits", *ARGS,
                           f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def run_until(workdir, step, sig):
  """Start the run and send `sig` once it reports a step >= `step`; returns (rc, stderr)."""
  proc = launch(workdir)
  for line in proc.stdout:
    if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
      proc.send_signal(sig)
      break
  proc.stdout.read()
  return proc.wait(timeout=300), proc.stderr.read()


def final_params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    state = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return state.state["params"]


def values(workdir):
  return [{k: v for k, v in r.items() if k == "step" or k.startswith(("loss", "eval_", "grad"))}
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  rc, err = run_until(workdir, STEPS + 1, signal.SIGTERM)  # never signalled
  assert rc == 0, err[-2000:]
  return workdir


def assert_same_end(workdir, straight):
  a, b = final_params(workdir), final_params(straight)
  for x, y in zip(sorted(_leaves(a)), sorted(_leaves(b)), strict=True):
    assert x[0] == y[0]
    np.testing.assert_array_equal(x[1], y[1], err_msg=x[0])
  assert values(workdir) == values(straight)


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", np.asarray(value)


def test_five_kill_9s_at_random_points_end_bit_identical(straight, tmp_path):
  workdir = str(tmp_path)
  targets = sorted(np.random.default_rng(0).choice(np.arange(3, STEPS - 2), 5, replace=False))
  for target in targets:
    rc, _ = run_until(workdir, int(target), signal.SIGKILL)
    assert rc == -signal.SIGKILL
  rc, err = run_until(workdir, STEPS + 1, signal.SIGTERM)
  assert rc == 0, err[-2000:]
  assert_same_end(workdir, straight)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_bit_identically(straight, tmp_path):
  workdir = str(tmp_path)
  rc, err = run_until(workdir, 10, signal.SIGTERM)
  assert rc == 143, err[-2000:]
  assert "Traceback" not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith("SIGTERM at step ") and "rerun the same command to resume" in line
  stopped = int(line.split()[3].rstrip(":"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
  rc, err = run_until(workdir, STEPS + 1, signal.SIGTERM)
  assert rc == 0, err[-2000:]
  assert_same_end(workdir, straight)
