"""End to end: the smoke variant trains, checkpoints, is interrupted, resumes exactly."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from experiments.configs import cosmoflow as configs
from sdl.data import loader
from sdl.optim import kfac
from sdl.parallel import ConfigError, make_mesh
from experiments.trainers import cosmoflow
from sdl.data import cosmoflow as cosmoflow_data
from sdl.models.cosmoflow import LEAKY_SLOPE
from sdl.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(Exception):
  pass


@pytest.fixture(scope="module")
def smoke():
  config = configs.get_config("smoke")
  return config, cosmoflow_data.make_datasets(config)


@pytest.mark.parametrize("pooled", [False, True])
def test_interrupted_run_resumes_to_identical_parameters(smoke, tmp_path, pooled):
  """Also with the demo's pooled head (batch statistics in the checkpoint) and augmented
  batches (symmetries drawn from the step: the resumed steps see the same ones)."""
  config, datasets = smoke
  if pooled:
    config = config.copy_and_resolve_references()
    config.model.head, config.data.augment = "pooled", True
  straight = cosmoflow.run(config, str(tmp_path / "straight"), datasets=datasets)
  assert int(straight.step) == config.train.steps

  def crash_after_5(step, state):
    if step == 5:
      raise Crash
  workdir = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    cosmoflow.run(config, workdir, datasets=datasets, hooks=[crash_after_5])
  kept = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert max(kept) == 3  # the crash at step 5 lost steps 4-5; the resume must redo them
  resumed = cosmoflow.run(config, workdir, datasets=datasets)

  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Training moved the parameters, and the metrics read as one uninterrupted run.
  init = jax.jit(lambda: cosmoflow.build_model(config, cosmoflow.validate(config, 8), None).init(
      jax.random.PRNGKey(config.seed), datasets[0].volumes[:1])["params"])()
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(init))]
  assert min(moved) > 0
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 3, 4, 6]
  straight_records = read_jsonl(os.path.join(tmp_path / "straight", "metrics.jsonl"))
  assert [r["loss"] for r in records] == [r["loss"] for r in straight_records]
  for key in ("step", "loss", "lr", "steps_per_sec", "input_wait_s", "mae"):
    assert all(key in r for r in records)
  assert all("eval_mae" in r for r in records if r["step"] in (3, 6))
  # The mean predictor's score sits beside the model's, on the samples evaluate visits.
  train, val = datasets
  n = len(val) // config.train.batch_size * config.train.batch_size
  mean_err = train.labels.mean(0) - val.labels[:n]
  last = records[-1]
  np.testing.assert_allclose(last["eval_baseline_loss"], np.mean(mean_err ** 2), rtol=1e-6)
  for i in range(4):
    np.testing.assert_allclose(last[f"eval_baseline_mse_param_{i}"],
                               np.mean(mean_err[:, i] ** 2), rtol=1e-6)
  np.testing.assert_allclose(np.mean([last[f"eval_mse_param_{i}"] for i in range(4)]),
                             last["eval_loss"], rtol=1e-5)


def test_head_and_augment_configs_name_the_fix(smoke):
  config = smoke[0].copy_and_resolve_references()
  config.model.head = "gap"
  with pytest.raises(ConfigError, match="model.head='gap': choose one of"):
    cosmoflow.validate(config, 8)
  config.model.update(head="pooled", slab_layers=2)
  with pytest.raises(ConfigError, match="model.slab_layers=0"):
    cosmoflow.validate(config, 8)
  config.model.slab_layers = 0
  config.data.update(augment=True, source="disk", path="/tmp")
  with pytest.raises(ConfigError, match="data.augment=True.*data.source='generate'"):
    cosmoflow.validate(config, 8)
  config.data.update(augment=False, source="generate")
  for remat, fix in (((("conv1", "conv9", "full"),), r"no layer 'conv9'; the layers are "
                      r"conv1, avgpool1, conv2"),
                     ((("conv2", "conv1", "full"),), "conv1 comes before conv2"),
                     ((("conv1", "conv2", "all"),), r"the policy one of \['full', 'save_convs'\]"),
                     ((("conv2", "conv3", "full"), ("conv1", "avgpool1", "full")),
                      "list the blocks in layer order, apart")):
    config.model.remat = remat
    with pytest.raises(ConfigError, match=rf"model.remat=.*: block .*{fix}"):
      cosmoflow.validate(config, 8)
  config.model.update(remat=(("conv1", "avgpool1", "full"),), slab_layers=2, head="flatten")
  with pytest.raises(ConfigError, match=r"conv1 is in the stem \(the first 2 layers"):
    cosmoflow.validate(config, 8)


def test_nan_loss_stops_with_the_step(smoke, tmp_path):
  config, datasets = smoke
  config = config.copy_and_resolve_references()
  config.optim.lr = 1e30
  config.optim.clip_norm = 0.0
  with pytest.raises(FloatingPointError,
                     match=r"loss is nan at step \d+ \(mean of steps \d+-\d+\): lower optim.lr"):
    cosmoflow.run(config, str(tmp_path), datasets=datasets)


def test_loop_launches_nothing_on_the_devices_between_steps(smoke, tmp_path, monkeypatch):
  """The logged training metrics are means over the steps since the last record, summed on
  the host (`sdl.train.loop._host_sums`): with jax's array `+` raising, the run completes.
  Summing them with device-side adds queued small launches between the mesh's steps, and
  the 4-device demo wedged in XLA:CPU's collective rendezvous (docs/benchmarks.md)."""
  config, datasets = smoke
  config = config.copy_and_resolve_references()
  config.train.update(steps=4, log_every=2, eval_every=4, checkpoint_every=4)

  array_type = type(jax.numpy.zeros(()))
  add, radd = array_type.__add__, array_type.__radd__

  def on_one_device(op):  # host-side scalars (the lr schedule) may still use the default device
    def checked(a, b):
      if len(a.sharding.device_set) > 1:
        raise AssertionError("a computation launched on every device between steps")
      return op(a, b)
    return checked
  monkeypatch.setattr(array_type, "__add__", on_one_device(add))
  monkeypatch.setattr(array_type, "__radd__", on_one_device(radd))
  cosmoflow.run(config, str(tmp_path), datasets=datasets)
  records = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 4] and all(np.isfinite(r["loss"]) for r in records)


def test_command_line_entry_point(tmp_path):
  workdir = tmp_path / "cli"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.cosmoflow",
       "--config=experiments/configs/cosmoflow.py:smoke", f"--workdir={workdir}",
       "--config.train.steps=2", "--config.train.eval_every=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 2/2 | loss" in out.stdout and "steps/s | ETA" in out.stdout
  assert "first step (compile + run)" in out.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == 2 and config["model"]["variant"] == "lbann"
  png = (workdir / "loss_curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  (record,) = read_jsonl(str(workdir / "metrics.jsonl"))
  assert record["step"] == 2 and np.isfinite(record["eval_mae"])


def test_train_step_compiles_once_and_keeps_shardings(smoke):
  config, (train_set, _) = smoke
  plan = cosmoflow.validate(config, jax.device_count())
  c = cosmoflow.build(config, plan, make_mesh(plan.mesh_shape, config.mesh.axes))
  state = c.init_state()
  batch = config.train.batch_size
  source = loader.ArraySource.of_volumes(train_set.volumes, train_set.labels, c.batch_sharding)
  for i in range(3):  # the smoke set holds 2 batches
    state, metrics = c.train_step(state, source.batch(np.arange(batch) + (i % 2) * batch))
  assert c.train_step._cache_size() == 1  # no silent recompiles from step to step
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(c.abstract_state)):
    assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)


def test_disk_and_memory_sources_train_like_generated_data(smoke, tmp_path):
  config, datasets = smoke
  subprocess.run([sys.executable, "-m", "experiments.make_dataset",
                  "--config=experiments/configs/cosmoflow.py:smoke", f"--out={tmp_path / 'data'}"],
                 cwd=ROOT, check=True, capture_output=True, env={**os.environ, "XLA_FLAGS": ""})
  final = {}
  for source in ("generate", "disk", "memory"):
    c = config.copy_and_resolve_references()
    c.data.update(source=source, path=str(tmp_path / "data"))
    c.train.update(steps=2, eval_every=2)
    final[source] = cosmoflow.run(c, str(tmp_path / source),
                                  datasets=datasets if source == "generate" else None)
    assert read_jsonl(str(tmp_path / source / "metrics.jsonl"))[-1]["eval_mae"] > 0
  for source in ("disk", "memory"):
    for a, b in zip(jax.tree.leaves(final[source]), jax.tree.leaves(final["generate"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = config.copy_and_resolve_references()
  c.data.update(source="disk", path=str(tmp_path / "data"), input_size=16)
  with pytest.raises(ConfigError, match=r"volumes of \[32, 32, 32, 4\] but "
                     r"data.input_size=16"):
    cosmoflow_data.open_datasets(c)
  c.data.path = ""
  with pytest.raises(ConfigError, match="set data.path"):
    cosmoflow.validate(c, 8)


def test_precise_batch_stats_are_the_population_statistics_of_the_training_batches(smoke):
  """Before an evaluation the pooled head's batch norm gets the mean and (biased) variance
  of its features over the training batches, on the 4 x 2 mesh, as numpy computes them
  from the captured convolutions of one device; the running statistics stay in the state."""
  config, (train_set, _) = smoke
  config = config.copy_and_resolve_references()
  config.model.head = "pooled"
  plan = cosmoflow.validate(config, jax.device_count())
  c = cosmoflow.build(config, plan, make_mesh(plan.mesh_shape, config.mesh.axes))
  state = c.init_state()
  batch = config.train.batch_size
  source = loader.ArraySource.of_volumes(train_set.volumes, train_set.labels, c.batch_sharding)
  state, _ = c.train_step(state, source.batch(np.arange(batch)))  # running stats move
  precise = cosmoflow.precise_batch_stats(c, state, source, batch)

  samples = len(train_set) // batch * batch  # 2 batches: their spread must count
  assert samples == 2 * batch
  one_device = cosmoflow.build_model(config, plan, None)
  params = jax.device_get(state.params)
  _, captured = one_device.apply({"params": params, **jax.device_get(state.model_state)},
                                 train_set.volumes[:samples], capture_intermediates=True,
                                 mutable=["intermediates"])
  slope = LEAKY_SLOPE["lbann"]
  convs = sorted(k for k in captured["intermediates"] if k.startswith("Conv3D_"))
  assert len(convs) == 7
  features = np.concatenate(
      [(lambda a: np.where(a > 0, a, slope * a).mean((1, 2, 3)))(
          np.asarray(captured["intermediates"][k]["__call__"][0], np.float64)) for k in convs],
      -1)
  stats = jax.device_get(precise.model_state["batch_stats"]["head_norm"])
  np.testing.assert_allclose(stats["mean"], features.mean(0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats["var"], features.var(0), rtol=1e-3, atol=1e-9)
  running = jax.device_get(state.model_state["batch_stats"]["head_norm"]["mean"])
  assert not np.allclose(running, stats["mean"], rtol=1e-2)



def kfac_smoke(config, mesh_shape, mesh_axes, fisher="sampled"):
  """The smoke run's trainer with K-FAC (the config's damping, statistics every 2 updates,
  inverses every 3) on the first devices, as one mesh; the batch over `node` and `local`
  where the mesh has them."""
  c = config.copy_and_resolve_references()
  c.model.dropout = "0"
  c.optim.update(name="kfac", warmup_steps=0)
  c.optim.kfac.update(stats_every=2, inverse_every=3, max_factor_dim=512, fisher=fisher)
  c.train.steps = 100  # the cosine schedule stays well above 0
  c.mesh.update(shape=mesh_shape, axes=mesh_axes)
  if "node" in mesh_axes:
    c.mesh.rules = (("batch", ("node", "local")), ("depth", "spatial"))
  n = math.prod(mesh_shape)
  plan = cosmoflow.validate(c, n)
  return cosmoflow.build(c, plan, make_mesh(plan.mesh_shape, mesh_axes, jax.devices()[:n]))


def kfac_smoke_step(c, batches, state, i):
  """Update `i` from the host `state`, on `c`'s mesh, back on the host."""
  new, _ = c.train_step(jax.device_put(state, jax.tree.map(lambda a: a.sharding,
                                                           c.abstract_state)),
                        jax.device_put(batches[i % 2], c.batch_sharding))
  return jax.device_get(new)


def chain_part(state, kind):
  """The optimiser chain's state of one transform, found by its type."""
  (found,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, kind))
              if isinstance(s, kind)]
  return found


@pytest.fixture(scope="module")
def kfac_trajectory(smoke):
  """One device's K-FAC run of 8 smoke steps: the trainer's batches and every state."""
  config, (train_set, _) = smoke
  b = config.train.batch_size
  batches = [{"volume": train_set.volumes[k * b:(k + 1) * b],
              "label": train_set.labels[k * b:(k + 1) * b]} for k in range(2)]
  one = kfac_smoke(config, (1, 1), ("data", "spatial"))
  states = [jax.device_get(one.init_state())]
  for i in range(8):
    states.append(kfac_smoke_step(one, batches, states[i], i))
  return batches, states


@pytest.mark.parametrize("shape,axes", [((2, 2), ("data", "spatial")),
                                        ((2, 2, 2), ("data", "spatial", "spatial_h")),
                                        ((2, 2, 2), ("node", "local", "spatial"))])
def test_kfac_on_a_data_x_spatial_mesh_updates_like_one_device(smoke, kfac_trajectory, shape,
                                                               axes):
  """CosmoFlow (the smoke lbann net) with K-FAC on the demo's 2 x 2 data x depth mesh, on a
  2 x 2 x 2 data x depth x height mesh, and on a 2 x 2 x 2 node x local x depth mesh with
  the batch over node x local (the statistics summed hierarchically: a reduce-scatter
  within the node, asserted on the compiled step), one compiled step each (no phases: the
  transform decides each update's work from its counter). From every state of one device's
  trajectory, the mesh's step is compared with one device's, leaf by leaf, within 1e-5
  relative: the factors after statistics steps (2, 4, 6), the inverses after an inverse
  step from stored factors (3: bit-equal in fact), and the update of every step that does
  not re-estimate and re-invert at once (1-5, 7; within 4e-7 here).

  Steps 0 and 6 do both: the fresh factors differ from one device's by fp32 rounding
  (another summation order, ~1e-7), and inverting amplifies that by the damped factor's
  condition number. That is largest for the last layer's input factor (its inputs, the
  32³ net's 1³ features, barely vary across examples), whose inverse differs by up to
  2e-5; its kernel update is the difference of two nearly equal products and moves by up
  to 1e-3 of itself (6e-1 at the initialisation, where the net's output is ~1e-6 whatever
  the input). Those steps assert the factors within 1e-5 and the inverses within 1e-4; the
  next test shows their updates differ from one device's as much as one device's differ
  from its own with the batch reversed."""
  batches, states = kfac_trajectory
  mesh = kfac_smoke(smoke[0], shape, axes)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh.batch_sharding[k])
           for k, v in batches[0].items()}
  hlo = mesh.train_step.lower(mesh.abstract_state, batch).as_text()
  assert ("reduce_scatter" in hlo) == ("node" in axes)
  rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)

  def check(name, got, want, bound):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      assert rel(a, b) < bound, (i, name, jax.tree_util.keystr(path), rel(a, b))

  momentum = smoke[0].optim.momentum
  trace = lambda s: chain_part(s, optax.TraceState).trace
  for i in range(8):
    got, want, before = kfac_smoke_step(mesh, batches, states[i], i), states[i + 1], states[i]
    stats, inverse = kfac.phase_at(i, 2, 3)
    k_got, k_want = chain_part(got, kfac.KfacState), chain_part(want, kfac.KfacState)
    check("factors", k_got.factors, k_want.factors, 1e-5)
    check("inverses", k_got.inverses, k_want.inverses, 1e-4 if stats and inverse else 1e-5)
    if not (stats and inverse):
      # The update itself (lr aside): the momentum trace less its identical decayed past.
      # (Parameters are compared too coarsely: ulp(p) is ~1e-3 of a step's change.)
      update = lambda s: jax.tree.map(lambda t, t0: np.asarray(t, np.float64) - momentum * t0,
                                      trace(s), trace(before))
      check("update", update(got), update(want), 1e-5)
    assert ({k: int(v) for k, v in k_got.inversions.items()}
            == {k: int(v) for k, v in k_want.inversions.items()})
  assert int(k_got.stats_updates) == 4 and set(
      int(v) for v in k_got.inversions.values()) == {3}


def test_kfac_reestimate_and_invert_steps_differ_from_one_device_as_it_does_from_itself(
    smoke):
  """The steps that re-estimate and re-invert at once (0 and 6 here), where the update is
  not within 1e-5 of one device's (test above): with the empirical Fisher (each example's
  own gradient, so the batch's order is a summation order and nothing else), one device
  given its batch in reverse order moves its update by 1e-4 relative, and the 2 x 2 mesh
  moves it by no more than twice that. Every other step agrees within 1e-5 both ways."""
  config, (train_set, _) = smoke
  b = config.train.batch_size
  batches = [{"volume": train_set.volumes[k * b:(k + 1) * b],
              "label": train_set.labels[k * b:(k + 1) * b]} for k in range(2)]
  reversed_batches = [{k: v[::-1].copy() for k, v in batch.items()} for batch in batches]
  one = kfac_smoke(config, (1, 1), ("data", "spatial"), fisher="empirical")
  mesh = kfac_smoke(config, (2, 2), ("data", "spatial"), fisher="empirical")
  momentum = config.optim.momentum
  flat = lambda s: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in
                                   jax.tree.leaves(chain_part(s, optax.TraceState).trace)])
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  state = jax.device_get(one.init_state())
  for i in range(7):
    want = kfac_smoke_step(one, batches, state, i)
    update = lambda s: flat(s) - momentum * flat(state)
    itself = rel(update(kfac_smoke_step(one, reversed_batches, state, i)), update(want))
    across = rel(update(kfac_smoke_step(mesh, batches, state, i)), update(want))
    stats, inverse = kfac.phase_at(i, 2, 3)
    if stats and inverse:
      assert 1e-5 < itself < 1e-3 and across < 2 * itself, (i, itself, across)
    else:
      assert itself < 1e-5 and across < 1e-5, (i, itself, across)
    state = want
