"""The K-FAC performance model against published counts, closed forms and compiled HLO."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from experiments.trainers import kfac_scaling
from sdl.bench import kfac_model
from sdl.bench.hlo import collective_bytes
from sdl.optim import kfac
from sdl.train.step import Model, TrainState, make_train_step
from tests.test_kfac import Hybrid, batch_for, mse


def test_resnet50_matches_its_published_size():
  layers = kfac_model.resnet50()
  # torchvision's resnet50 has 25,557,032 parameters; its 53 batch norms hold 2 x 26,560.
  assert sum(l.params for l in layers) == 25_557_032 - 2 * 26_560
  assert len(layers) == 54  # 49 convolutions on the main path, 4 projections, 1 classifier
  macs = sum(l.flops for l in layers) / 2
  assert 4.0e9 < macs < 4.2e9, macs  # "4.1 GFLOPs" (multiply-adds) for v1.5
  widest = max(layers, key=lambda l: l.d_in)
  assert (widest.d_in, widest.d_out) == (3 * 3 * 512, 512)
  # the geometry the calibration times agrees with the model's layers
  geometry = kfac_scaling.resnet50_geometry()
  for layer in layers[:-1]:
    c_in, c_out, k, stride, side = geometry[layer.name]
    assert layer.d_in == k * k * c_in and layer.d_out == c_out
    assert layer.positions == (side // stride) ** 2, layer.name


def test_all_reduce_time_is_the_hierarchical_closed_form():
  net = kfac_model.Network(devices_per_node=4, alpha_intra=1e-6, beta_intra=1 / 50e9,
                           alpha_inter=3e-6, beta_inter=1 / 25e9)
  n = 1e8
  assert kfac_model.all_reduce_seconds(n, 1, net) == 0
  # one node: reduce-scatter + all-gather over 4, each (p-1)/p n β, tree latency 2 log2(4) α
  one = 2 * 0.75 * n / 50e9 + 2 * 2 * 1e-6
  assert kfac_model.all_reduce_seconds(n, 4, net) == pytest.approx(one)
  # 64 nodes: plus the nodes' all-reduce, 2 (N-1)/N n over the node's links
  many = one + 2 * 63 / 64 * n / 25e9 + 2 * 6 * 3e-6
  assert kfac_model.all_reduce_seconds(n, 256, net) == pytest.approx(many)


def test_predict_amortises_and_splits_inverses_like_kfac():
  layers = [kfac_model.conv(f"c{i}", 16 * (i + 1), 32, 3, 8) for i in range(5)]
  device = kfac_model.Device(flops=1e12, gemm_flops=1e12, eigh_rate=1e9)
  net = kfac_model.Network(4, 0.0, 1e-10, 0.0, 1e-10)
  every = kfac_model.predict(layers, 4, device, net, kfac_model.Settings(batch=8))
  stale = kfac_model.predict(layers, 4, device, net,
                             kfac_model.Settings(batch=8, stats_every=10, inverse_every=50))
  for part in ("statistics", "factor all-reduce"):
    assert stale[part] == pytest.approx(every[part] / 10)
  for part in ("inverses", "inverse share"):
    assert stale[part] == pytest.approx(every[part] / 50)
  for part in ("forward/backward", "preconditioning", "weight all-reduce"):
    assert stale[part] == every[part]
  # the busiest device of kfac.assign_inverses's split, by closed form
  owner = kfac.assign_inverses({l.name: kfac_model._Widths(l.d_in, l.d_out) for l in layers}, 4)
  load = [sum((l.d_in ** 3 + l.d_out ** 3) / 1e9 for l in layers if owner[l.name] == d)
          for d in range(4)]
  assert every["inverses"] == pytest.approx(max(load))
  assert kfac_model.predict(layers, 1, device, net, kfac_model.Settings(batch=8))[
      "inverses"] == pytest.approx(sum(load))
  stats = sum(2 * 8 * l.positions * (l.d_in ** 2 + l.d_out ** 2) for l in layers) / 0.7e12
  assert every["statistics"] == pytest.approx(stats)

  # Rates by width: each factor's statistics GEMM at its width's efficiency, each layer's
  # preconditioning at its smaller width's, each eigendecomposition at its width's rate.
  eff = lambda w: w / 1000
  by_width = kfac_model.predict(layers, 1, kfac_model.Device(1e12, 1e12, lambda n: 1e6 * n),
                                net, kfac_model.Settings(batch=8), gemm_efficiency=eff)
  assert by_width["statistics"] == pytest.approx(sum(
      2 * 8 * l.positions * (l.d_in ** 2 / eff(l.d_in) + l.d_out ** 2 / eff(l.d_out))
      for l in layers) / 1e12)
  assert by_width["preconditioning"] == pytest.approx(sum(
      2 * (l.d_in ** 2 * l.d_out + l.d_in * l.d_out ** 2) / eff(min(l.d_in, l.d_out))
      for l in layers) / 1e12)
  assert by_width["inverses"] == pytest.approx(sum(
      (l.d_in ** 2 + l.d_out ** 2) / 1e6 for l in layers))


def test_width_efficiency_interpolates_in_log_width_and_holds_its_ends():
  curve = kfac_scaling.width_efficiency({64: 0.2, 256: 0.6, 1024: 0.8})
  assert curve(64) == pytest.approx(0.2) and curve(256) == pytest.approx(0.6)
  assert curve(128) == pytest.approx(0.4)  # halfway in log2 between 64 and 256
  assert curve(16) == pytest.approx(0.2) and curve(4096) == pytest.approx(0.8)


def test_the_models_bytes_are_what_the_compiled_step_all_reduces():
  """K-FAC data parallel over 8 devices, a step with statistics and inverses: the compiled
  HLO's all-reduces carry the gradients, the factor sums and every layer's inverses, as
  `communicated_bytes` counts them, plus a few scalars (loss, counts)."""
  model, batch = Hybrid(), batch_for((16, 4, 3, 3, 2))
  layers = kfac.find_layers(model, batch["x"])
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  tx = optax.chain(kfac.kfac(layers, axis_names=("data",), grad_factors=False),
                   optax.sgd(0.1))
  grads = kfac.gradients(layers, axis_names=("data",), grad_factors=False)
  step = make_train_step(Model(model), mse, tx, gradients=grads, mesh=mesh,
                         batch_axes=("data",))
  params = model.init(jax.random.key(0), batch["x"])["params"]
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(1)))
  hlo = jax.jit(step, static_argnums=2).lower(state, batch, kfac.Phase(True, True)).compile(
      ).as_text()
  got = collective_bytes(hlo)
  shapes = jax.eval_shape(lambda: kfac.zero_perturbations(
      kfac.module_forward(model, batch["x"]), layers, params))
  positions = {n: math.prod(s.shape[1:-1]) for n, s in kfac.by_layer(shapes).items()}
  want = kfac_model.communicated_bytes(
      [kfac_model.layer_of(spec, positions[n]) for n, spec in layers.items()],
      kfac_model.Settings(batch=2, grad_bytes=4, factor_bytes=4))
  assert want["weight all-reduce"] == 4 * sum(x.size for x in jax.tree.leaves(params))
  assert 0 <= got - sum(want.values()) <= 64, (got, want)
  # without statistics or inverses only the gradients (and the loss) travel
  plain = jax.jit(step, static_argnums=2).lower(state, batch, kfac.Phase(False, False))
  got = collective_bytes(plain.compile().as_text())
  assert 0 <= got - want["weight all-reduce"] <= 64, (got, want)


def test_hlo_collective_bytes_reads_tuples_and_async_pairs():
  text = """
  %a = f32[16,4]{1,0} all-reduce(f32[16,4]{1,0} %x), replica_groups={}
  %b = (bf16[8]{0}, f32[3]{0}) all-reduce(bf16[8]{0} %y, f32[3]{0} %z), to_apply=%add
  %c = f32[10]{0} all-reduce-start(f32[10]{0} %w), to_apply=%add
  %d = f32[10]{0} all-reduce-done(f32[10]{0} %c)
  %e = f32[99]{0} all-gather(f32[9]{0} %v), dimensions={0}
  """
  assert collective_bytes(text) == 16 * 4 * 4 + 8 * 2 + 3 * 4 + 10 * 4
  assert collective_bytes(text, "all-gather") == 99 * 4


def test_resnet50_at_scale_and_its_plot(tmp_path):
  results = kfac_scaling.resnet50_at_scale((16, 2048), eigh=1e11)
  for by_devices in results.values():
    small, large = by_devices[16], by_devices[2048]
    assert large["forward/backward"] == small["forward/backward"]  # weak scaling
    assert large["inverses"] <= small["inverses"]  # the split has more devices
    assert large["weight all-reduce"] > small["weight all-reduce"]  # more nodes
  path = tmp_path / "parts.png"
  kfac_scaling.plot(results, str(path), kfac_scaling.published_step_seconds())
  assert path.stat().st_size > 10_000
  assert kfac_scaling.published_step_seconds() == pytest.approx(
      5.5 * 60 / (35 * 1_281_167 / 32_768))

