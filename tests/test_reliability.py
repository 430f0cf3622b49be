"""Nothing lost, nothing confusing: no NaN reaches a checkpoint, a resume checks what it
resumes, kill -9 and SIGTERM lose nothing, a full disk keeps the last checkpoint."""
import errno
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments.configs import digits as configs
from experiments.trainers import digits as trainer
from sdl import console
from sdl.data import digits
from sdl.errors import CheckpointError, NonFiniteError
from sdl.parallel import make_mesh
from sdl.train import loop, run_config
from sdl.train.checkpoint import Checkpointer
from sdl.train.metrics import read_jsonl
from sdl.train.step import Model, TrainState, make_train_step


def smoke(variant="autoencoder", **overrides):
  config = configs.get_config(f"{variant},smoke")
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def saved_states(workdir):
  """Every checkpoint's raw state leaves under `workdir`, by step."""
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    return {step: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state for step in manager.all_steps()}


def test_a_diverging_run_never_writes_a_nonfinite_checkpoint_and_a_sane_rerun_finishes(
    tmp_path):
  """CosmoFlow's smoke run at lr 1e6 with a checkpoint every step: the state turns
  non-finite within a few steps, and no checkpoint holds a NaN. Rerun with the config's
  lr, following the error messages: the last finite checkpoint (written after the
  divergence began) leads to NaN again, and the message says to delete it; from the one
  before, the run trains to the end."""
  import re
  import shutil

  from experiments.configs import cosmoflow as cosmoflow_configs
  from experiments.trainers import cosmoflow
  from sdl.data import cosmoflow as cosmoflow_data

  def config(**train):
    c = cosmoflow_configs.get_config("smoke")
    c.train.update(checkpoint_every=1, keep_checkpoints=20, log_every=6, eval_every=6, **train)
    return c
  datasets = cosmoflow_data.make_datasets(config())
  workdir = str(tmp_path)
  diverging = config()
  diverging.optim.lr = 1e6
  with pytest.raises(NonFiniteError, match=r"not finite after step \d+ .*lower optim.lr.*"
                                           r"train.skip_nonfinite.*a rerun resumes from "
                                           r"checkpoint \d+, the last verified finite"):
    cosmoflow.run(diverging, workdir, datasets=datasets)
  states = saved_states(workdir)
  assert states and max(states) < diverging.train.steps
  for step, state in states.items():  # every one checked; none holds a NaN
    for leaf in jax.tree.leaves(state):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.isfinite(np.asarray(leaf)).all(), step
  for _ in range(len(states)):
    try:
      state = cosmoflow.run(config(), workdir, datasets=datasets)
      break
    except NonFiniteError as error:
      delete = re.search(r"delete (\S+) to resume from checkpoint (\d+)", str(error))
      assert delete, str(error)
      shutil.rmtree(delete[1])
  assert int(state.step) == diverging.train.steps and bool(state.finite)
  history = read_jsonl(os.path.join(workdir, run_config.HISTORY))
  assert history[-1]["changed"]["optim.lr"] == [1e6, 0.001]


def test_a_resume_refuses_a_nonfinite_checkpoint(tmp_path):
  config = smoke(train__steps=4)
  workdir = str(tmp_path)
  state = trainer.run(config, workdir)
  bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 5)
  meta = ckpt.read_meta()
  ckpt.save(5, bad, meta, force=True)  # as a buggy writer might have left it
  ckpt.close()
  with pytest.raises(CheckpointError, match=r"step 5 .* holds NaN or infinite values; delete "):
    trainer.run(smoke(train__steps=8), workdir)


@pytest.mark.parametrize("optimizer", ["sgd", "kfac"])
def test_skipped_nonfinite_updates_leave_the_state_and_are_counted(optimizer, tmp_path):
  variant = "autoencoder_kfac" if optimizer == "kfac" else "autoencoder"
  config = smoke(variant, train__skip_nonfinite=True, train__log_every=4, train__eval_every=8)
  mesh = make_mesh((1,), ("data",), jax.devices()[:1])
  x, y, test_x, test_y = digits.load(0)
  c = trainer.build(config, mesh, {"x": x[:1], "y": y[:1]})

  def batch(step):
    xs = x[step * 64:(step + 1) * 64].copy()
    if step == 2:
      xs[0, 0, 0, 0] = np.nan  # one poisoned image: the whole update is non-finite
    return {"x": jnp.asarray(xs), "y": jnp.asarray(y[step * 64:(step + 1) * 64])}

  before = {}

  def keep(step, state):
    before[step] = jax.tree.map(np.asarray, (state.params, state.opt_state))
  state = loop.fit(workdir=str(tmp_path), config=config, init_state=c.init_state,
                   abstract_state=c.abstract_state, train_step=c.train_step, get_batch=batch,
                   evaluate=None, schedule=c.schedule, phase_of=c.phase_of, hooks=[keep])
  assert int(state.step) == 8 and bool(state.finite)
  for a, b in zip(jax.tree.leaves(before[2]), jax.tree.leaves(before[3])):  # step 3 skipped
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[3]),
                                                       jax.tree.leaves(before[4])))
  records = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["skipped_updates"] for r in records] == [1, 0]
  assert all(np.isfinite(r["loss"]) for r in records)
  if optimizer == "kfac":  # K-FAC's own state skipped too: its counter stayed behind
    assert int(state.opt_state[0].count) == 8 - 1


def test_the_step_flags_a_nonfinite_update_without_skipping():
  model = Model(trainer.MODELS["autoencoder"][0]())
  x = jnp.asarray(digits.load(0)[0][:8])
  params = model.init(jax.random.key(0), {"x": x})[0]
  tx = optax.sgd(0.1)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(1)))
  step = jax.jit(make_train_step(model, trainer.MODELS["autoencoder"][1], tx))
  state, _ = step(state, {"x": x})
  assert bool(state.finite)
  state, _ = step(state, {"x": x.at[0, 0, 0, 0].set(jnp.inf)})
  state, _ = step(state, {"x": x})
  assert not bool(state.finite)  # sticky


def test_a_resume_checks_the_config_it_resumes(tmp_path, capsys):
  workdir = str(tmp_path)
  trainer.run(smoke(train__steps=4), workdir)
  with pytest.raises(CheckpointError, match=r"model.name: 'autoencoder' in the checkpoint, "
                                            r"'cnn' now.*another --workdir"):
    trainer.run(smoke(train__steps=8, model__name="cnn"), workdir)
  with pytest.raises(CheckpointError, match=r"seed: 0 in the checkpoint, 1 now"):
    config = smoke(train__steps=8)
    config.seed = 1
    trainer.run(config, workdir)
  capsys.readouterr()
  trainer.run(smoke(train__steps=8, optim__lr=0.05), workdir)
  out = capsys.readouterr().out
  assert "resumed from" in out and "optim.lr 0.1 -> 0.05" in out and "train.steps 4 -> 8" in out
  history = read_jsonl(os.path.join(workdir, run_config.HISTORY))
  assert [h["start_step"] for h in history] == [0, 4]
  assert history[1]["changed"] == {"optim.lr": [0.1, 0.05], "train.steps": [4, 8]}
  # config.json is the latest start's (the refused attempts did not touch it)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.05


def test_a_finished_run_does_nothing_again(tmp_path, capsys):
  workdir = str(tmp_path)
  first = trainer.run(smoke(train__steps=4), workdir)
  capsys.readouterr()
  again = trainer.run(smoke(train__steps=4), workdir)
  assert "already trained to step 4" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = smoke(train__steps=8)
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 8:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(CheckpointError, match=r"no space left on the device writing checkpoint 8 "
                                            r".*the previous checkpoint \(4\) is kept"):
    trainer.run(config, workdir)
  monkeypatch.setattr(ocp.CheckpointManager, "save", original)
  kept = sorted(saved_states(workdir))
  assert 8 not in kept and kept[-1] == 4
  assert int(trainer.run(config, workdir).step) == 8


def test_progress_redraws_in_place_only_on_a_terminal():
  log = io.StringIO()
  console.progress("generating: 1/2", final=False, stream=log)
  console.progress("generating: 2/2", final=True, stream=log)
  assert log.getvalue() == "generating: 1/2\ngenerating: 2/2\n"

  class Terminal(io.StringIO):
    def isatty(self):
      return True
  tty = Terminal()
  console.progress("a", final=False, stream=tty)
  console.progress("b", final=True, stream=tty)
  assert tty.getvalue() == "\ra\rb\n"



def test_rates_and_eta_leave_out_the_first_steps_compile(tmp_path, capsys):
  import time
  config = smoke(train__steps=8, train__log_every=4, train__eval_every=8)
  mesh = make_mesh((1,), ("data",), jax.devices()[:1])
  x, y, _, _ = digits.load(0)
  c = trainer.build(config, mesh, {"x": x[:1], "y": y[:1]})
  calls = []

  def slow_first(state, batch, *phase):
    calls.append(None)
    if len(calls) == 1:
      time.sleep(2.0)  # a 2 s compile
    return c.train_step(state, batch, *phase)
  batch = {"x": jnp.asarray(x[:64]), "y": jnp.asarray(y[:64])}
  loop.fit(workdir=str(tmp_path), config=config, init_state=c.init_state,
           abstract_state=c.abstract_state, train_step=slow_first, get_batch=lambda s: batch,
           evaluate=None, schedule=c.schedule, phase_of=c.phase_of)
  first = read_jsonl(str(tmp_path / "metrics.jsonl"))[0]
  assert first["steps_per_sec"] > 5  # 3 steps after the compile; with it, under 2
  import re
  compile_s = float(re.search(r"first step \(compile \+ run\): ([\d.]+) s",
                              capsys.readouterr().out)[1])
  assert compile_s >= 2.0  # reported apart, with the compile
