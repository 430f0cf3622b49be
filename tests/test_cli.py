"""The command line as a user meets it: each mistake is one line on stderr, `error: ...`,
with no traceback, and exit status 2 (`experiments/trainers/entry.py`). Subprocesses share
the suite's persistent compilation cache (tests/conftest.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=experiments/configs/cosmoflow.py:smoke"


def cli(*args, module="experiments.cosmoflow"):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SDL_TRACEBACK")}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)


def assert_one_line(out, message):
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert message in lines[0], lines[0]


@pytest.mark.parametrize("args,message", [
    (["--config.train.steps=-5"], "train.steps=-5: give a whole number of at least 1"),
    (["--config.model.variant=mlperf", "--config.data.input_size=16"],
     "data.input_size=16 is too small for the mlperf network"),
    (["--config.model.spatial_layers=foo"], "model.spatial_layers='foo': give 'auto' or a number"),
    (["--config.train.step=10"], 'Did you mean "steps" instead of "step"?'),
    (["--config.train.warmup_steps=2"],  # a field of another section (optim)
     "--config.train.warmup_steps=2: the config has no field 'warmup_steps' in 'train'; "
     "experiments/configs/cosmoflow.py lists its fields"),
    (["--config.data.val_universes=1"],
     "the validation set (data.val_universes=1 x data.crops_per_universe=1 = 1 samples) is "
     "smaller than train.batch_size=4"),
    (["--config.train.batch_size=3", "--config.mesh.cpu_devices=4"],
     "train.batch_size=3 is not divisible by the 'data' mesh axis (2 devices)"),
])
def test_a_bad_config_is_one_line_and_status_2(args, message, tmp_path):
  assert_one_line(cli(SMOKE, f"--workdir={tmp_path}", *args), message)


def test_an_unknown_variant_is_one_line(tmp_path):
  out = cli("--config=experiments/configs/cosmoflow.py:nope", f"--workdir={tmp_path}")
  assert_one_line(out, "unknown cosmoflow config variant 'nope'")


def test_a_bad_workdir_is_one_line(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  assert_one_line(cli(SMOKE, f"--workdir={a_file}"), f"--workdir={a_file} is a file")
  assert_one_line(cli(SMOKE, "--workdir=/proc/sdl-run"),
                  "--workdir=/proc/sdl-run cannot be written")


def test_another_models_checkpoints_are_one_line_and_config_json_is_kept(tmp_path):
  from experiments.configs import digits as configs
  from experiments.trainers import digits as trainer
  config = configs.get_config("autoencoder,smoke")
  config.train.steps = 2
  trainer.run(config, str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  out = cli("--config=experiments/configs/digits.py:batchnorm_mlp,smoke", f"--workdir={tmp_path}",
            module="experiments.digits")
  assert_one_line(out, "model.name: 'autoencoder' in the checkpoint, 'batchnorm_mlp' now")
  assert (tmp_path / "config.json").read_text() == before


def test_traceback_on_request(tmp_path):
  out = cli(SMOKE, f"--workdir={tmp_path}", "--config.train.steps=-5", "--traceback")
  assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_a_resume_prints_no_library_warnings(tmp_path):
  first = cli(SMOKE, f"--workdir={tmp_path}", "--config.train.steps=2",
              "--config.train.eval_every=2")
  assert first.returncode == 0, first.stderr[-2000:]
  again = cli(SMOKE, f"--workdir={tmp_path}", "--config.train.steps=4",
              "--config.train.eval_every=2")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resumed from" in again.stdout and "train.steps 2 -> 4" in again.stdout
  noise = [line for line in again.stderr.splitlines()
           if not line.startswith("generating ")]  # the data's progress lines
  assert noise == [], noise


def _check_often(workdir: str, times: int) -> None:
  from sdl.train.run_config import check_workdir  # noqa: PLC0415
  for _ in range(times):
    check_workdir(workdir)


def test_the_processes_of_a_job_check_one_workdir_at_once(tmp_path):
  """Every process of a multi-process job checks the shared workdir as it starts; one's
  write probe must not be removed under another's feet (a shared probe name failed on a
  fresh workdir under mpirun)."""
  import multiprocessing  # noqa: PLC0415
  ctx = multiprocessing.get_context("spawn")
  workers = [ctx.Process(target=_check_often, args=(str(tmp_path / "w"), 300))
             for _ in range(4)]
  for w in workers:
    w.start()
  for w in workers:
    w.join(timeout=120)
  assert [w.exitcode for w in workers] == [0] * 4
  assert not list((tmp_path / "w").iterdir())  # every probe cleaned up
