"""The generic trainer with every optimiser through the one step: the digits trainer runs
SGD and K-FAC through `sdl.train.loop.fit`, is killed and resumes bit-identically; a
BatchNorm model's statistics are the same on 1 and 4 devices and match numpy; the
parameter sharding and the mesh axis names are configuration; old checkpoints get a
clear message."""
import os

import jax
import numpy as np
import pytest

from experiments.configs import digits as configs
from experiments.trainers import digits as trainer
from sdl.data import digits
from sdl.parallel import make_mesh
from sdl.errors import CheckpointError
from sdl.train.metrics import read_jsonl


class Crash(Exception):
  pass


def smoke(variant, **overrides):
  config = configs.get_config(f"{variant},smoke")
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("variant", ["autoencoder", "autoencoder_kfac"])
def test_digits_trains_through_fit_and_resumes_bit_identically(variant, tmp_path):
  config = smoke(variant)
  straight = trainer.run(config, str(tmp_path / "straight"))

  def crash_after_6(step, state):
    if step == 6:
      raise Crash
  workdir = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    trainer.run(config, workdir, hooks=[crash_after_6])
  resumed = trainer.run(config, workdir)
  leaves_equal(resumed, straight)
  if variant == "autoencoder_kfac":  # K-FAC's own state came back and kept counting
    kfac_state = resumed.opt_state[0]
    assert int(kfac_state.count) == config.train.steps
    assert int(kfac_state.stats_updates) == 4  # updates 0, 2, 4, 6 (stats_every=2)
    assert {int(v) for v in kfac_state.inversions.values()} == {3}  # 0, 3, 6
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  want = read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert [r["loss"] for r in records] == [r["loss"] for r in want]
  assert [r.get("eval_loss") for r in records] == [r.get("eval_loss") for r in want]
  assert records[-1]["loss"] < records[0]["loss"]


def test_kfac_step_compiles_once_per_phase():
  config = smoke("autoencoder_kfac")
  plan = trainer.validate(config, jax.device_count())
  mesh = make_mesh(plan.mesh_shape, config.mesh.axes)
  x, y, _, _ = digits.load(0)
  c = trainer.build(config, mesh, {"x": x[:1], "y": y[:1]})
  state = c.init_state()
  batch = {"x": jax.device_put(x[:64], c.batch_sharding["x"]),
           "y": jax.device_put(y[:64], c.batch_sharding["y"])}
  phases = [c.phase_of(i) for i in range(12)]
  for phase in phases:
    state, _ = c.train_step(state, batch, phase)
  assert len(set(phases)) == 4 and c.train_step._cache_size() == 4  # no silent recompiles


def test_batchnorm_statistics_are_equal_on_1_and_4_devices_and_match_numpy(tmp_path):
  states = {}
  for devices in (1, 4):
    config = smoke("batchnorm_mlp", mesh__shape=(devices,), train__steps=1,
                   train__log_every=1, train__eval_every=1)
    states[devices] = trainer.run(config, str(tmp_path / str(devices)))
  one, four = states[1], states[4]
  for a, b in zip(jax.tree.leaves(one.model_state), jax.tree.leaves(four.model_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
  # The first step's statistics in float64: momentum 0.9 from (mean 0, var 1) towards the
  # global batch's statistics of the first dense layer (at the initial parameters).
  config = smoke("batchnorm_mlp")
  x, y, _, _ = digits.load(config.seed)
  c = trainer.build(config, make_mesh((1,), ("data",), jax.devices()[:1]),
                    {"x": x[:1], "y": y[:1]})
  init = c.init_state()
  from sdl.data.sampler import EpochSampler
  indices = EpochSampler(len(x), config.train.batch_size, config.seed).indices(0)
  dense = jax.tree.map(lambda v: np.asarray(v, np.float64), init.params["Dense_0"])
  h = x[indices].reshape(len(indices), -1).astype(np.float64) @ dense["kernel"] + dense["bias"]
  stats = one.model_state["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(0), rtol=1e-4, atol=1e-6)


def test_fsdp_parameter_sharding_trains_like_replicated(tmp_path):
  replicated = trainer.run(smoke("autoencoder"), str(tmp_path / "replicated"))
  fsdp = trainer.run(smoke("autoencoder", mesh__params="fsdp"), str(tmp_path / "fsdp"))
  first = fsdp.params["Dense_0"]["kernel"]  # [64, 256]: split over the 8 'data' devices
  assert tuple(first.sharding.spec) == (None, "data") and len(first.addressable_shards) == 8
  assert first.addressable_shards[0].data.shape == (64, 32)
  momentum = [x for x in jax.tree.leaves(fsdp.opt_state) if x.shape == first.shape]
  assert momentum and all(tuple(m.sharding.spec) == (None, "data") for m in momentum)
  assert fsdp.params["Dense_0"]["bias"].sharding.is_fully_replicated  # too small to split
  for a, b in zip(jax.tree.leaves(fsdp.params), jax.tree.leaves(replicated.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_any_mesh_axis_names(tmp_path):
  mesh = make_mesh((2, 4), ("data", "model"))
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  config = smoke("autoencoder", mesh__axes=("replica",), mesh__rules=(("batch", "replica"),),
                 train__steps=2, train__eval_every=2)
  state = trainer.run(config, str(tmp_path))
  assert state.params["Dense_0"]["kernel"].sharding.mesh.axis_names == ("replica",)


def test_checkpoints_of_an_older_sdl_or_another_config_get_a_clear_message(tmp_path):
  import shutil
  config = smoke("autoencoder", train__steps=4)
  workdir = str(tmp_path / "run")
  trainer.run(config, workdir)
  with pytest.raises(CheckpointError, match="model.name: 'autoencoder' in the checkpoint"):
    trainer.run(smoke("batchnorm_mlp", train__steps=8), workdir)
  for step in os.listdir(os.path.join(workdir, "checkpoints")):  # as an older sdl left them
    shutil.rmtree(os.path.join(workdir, "checkpoints", step, "meta"), ignore_errors=True)
  with pytest.raises(CheckpointError, match=r"written by an older sdl.*without the config.*"
                                            r"another --workdir, or delete"):
    trainer.run(smoke("autoencoder", train__steps=8), workdir)


@pytest.mark.parametrize("configure", [True, False])
def test_entry_point_records_the_process_settings_it_applied(configure, tmp_path):
  """`python -m experiments.digits`: the process settings are applied (or, with the config
  knob off, not) before anything else, and `config.json` says which."""
  import json
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "experiments.digits",
       "--config=experiments/configs/digits.py:autoencoder,smoke", f"--workdir={tmp_path}",
       "--config.train.steps=2", "--config.train.eval_every=2",
       f"--config.process.configure={configure}"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env={k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "OPENBLAS_THREAD_TIMEOUT", "SDL_PROCESS_SETTINGS")})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 2/2 | loss" in out.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  applied = config["process"]["applied"]
  assert config["process"]["configure"] is configure and applied["enabled"] is configure
  if configure:
    assert applied["openblas_idle"] is True  # in time: before numpy loaded
    assert applied["allocator"] is (host_memory_supported())
  else:
    assert applied["allocator"] is None and applied["lapack_threads"] is None


def host_memory_supported() -> bool:
  from sdl import host_memory
  return host_memory._glibc() is not None
