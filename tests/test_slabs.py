"""The stem run one depth slab at a time gives the whole-volume network's loss and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import cosmoflow as configs
from experiments.trainers import cosmoflow as trainer
from sdl.errors import ConfigError
from sdl.models import slabs
from sdl.models.cosmoflow import CosmoFlow, feature_layers


def _loss_and_grads(model, params, counts, target):
  loss = lambda p: jnp.sum((model.apply({"params": p}, counts) - target) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def _as_stem_tree(params, count_convs):
  """The plain network's parameters renamed as a model with a stem of its first
  `count_convs` convolutions names them (stem/Conv3D_i, then Conv3D_0 onwards)."""
  out = {"stem": {}}
  for name, value in params.items():
    if name.startswith("Conv3D_"):
      i = int(name.split("_")[1])
      if i < count_convs:
        out["stem"][f"Conv3D_{i}"] = value
      else:
        out[f"Conv3D_{i - count_convs}"] = value
    else:
      out[name] = value
  return out


def _max_relative(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("variant,slab_layers,counts", [("lbann", 4, (2, 4)), ("mlperf", 4, (4,))])
def test_slab_gradients_equal_the_whole_volume_network(variant, slab_layers, counts):
  """fp32, 64³: the plain network (no stem) against the stem in 2 or 4 slabs, 1e-5 relative
  on every gradient; lbann's stem is conv + avg pool (padded, strided) twice, mlperf's conv +
  max pool twice."""
  size = 64
  rng = np.random.default_rng(0)
  volume = rng.poisson(3.0, size=(1, size, size, size, 4)).astype(np.int16)
  target = jnp.asarray(rng.normal(size=(1, 4)).astype(np.float32))
  plain = CosmoFlow(variant, size)
  params = plain.init(jax.random.PRNGKey(0), volume)["params"]
  loss0, grads0 = _loss_and_grads(plain, params, volume, target)
  convs = sum(l.kind == "conv" for l in feature_layers(variant, size)[:slab_layers])
  stem_params = _as_stem_tree(params, convs)
  want = _as_stem_tree(grads0, convs)
  for n in counts:
    model = CosmoFlow(variant, size, slab_layers=slab_layers, slabs=n)
    assert jax.tree.structure(model.init(jax.random.PRNGKey(0), volume)["params"]) == \
        jax.tree.structure(stem_params)
    loss, grads = _loss_and_grads(model, stem_params, volume, target)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
    assert _max_relative(grads, want) < 1e-5, (n, _max_relative(grads, want))


def test_slab_plan_covers_the_output_once():
  """Slab i's last-layer planes are [i q, (i + 1) q), and each layer's input window is what
  its outputs' windows reach (lbann at 512³, 16 slabs: 8 output planes each)."""
  windows = [l.window for l in feature_layers("lbann", 512)[:4]]
  p = slabs.plan(windows, 512, 16)
  assert p.sizes == (512, 512, 256, 256, 128)
  assert p.lengths[-1] == 8 and p.steps[-1] == 8 and p.starts[-1] == 0
  for layer, w in enumerate(windows):  # output planes [a, a + n) read [s a − p, s (a+n−1) − p + k)
    assert p.starts[layer] == p.starts[layer + 1] * w.stride - w.padding[0]
    assert p.lengths[layer] == (p.lengths[layer + 1] - 1) * w.stride + w.kernel
  # slab 0 reads from plane −(1 + 2·(1 + 1) + 1) = −6; slab 15 starts at −6 + 15·32 and reads
  # 41 planes, to 515: 6 zero planes before the volume and 3 after
  assert p.starts[0] == -6 and p.lengths[0] == 41 and p.padding == (6, 3)


def test_bad_slab_configs_name_the_fix():
  config = configs.get_config("smoke")
  config.model.update(slab_layers=4, slabs=3)
  with pytest.raises(ConfigError, match="model.slabs=3.*choose one of"):
    trainer.check_slabs(config, 1)
  config.model.update(slabs=2)
  with pytest.raises(ConfigError, match="spatial split"):
    trainer.check_slabs(config, 2)
  config.model.update(slab_layers=0)
  with pytest.raises(ConfigError, match="needs a stem"):
    trainer.check_slabs(config, 1)


@pytest.mark.parametrize("channels", [4, 32])  # the direct kernel's layer, a folded one
def test_bf16_saved_input_gives_the_gradients_of_the_rounded_input(channels):
  """A convolution that keeps its input in bf16 (computing in fp32): the input gradient is the
  fp32 one, the kernel gradient that of the input rounded to bf16, the output unchanged."""
  from sdl.models.conv import Conv3D  # noqa: PLC0415
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 12, 10, 14, channels)).astype(np.float32))
  dy = jnp.asarray(rng.normal(size=(1, 12, 10, 14, 16)).astype(np.float32))
  plain = Conv3D(16, lowering="folded")
  params = plain.init(jax.random.PRNGKey(0), x)
  stored = Conv3D(16, lowering="folded", save_dtype=jnp.bfloat16)
  vjp_of = lambda module, x: jax.vjp(lambda p, v: module.apply(p, v), params, x)
  y, vjp = vjp_of(plain, x)
  y_bf16, vjp_bf16 = vjp_of(stored, x)
  np.testing.assert_array_equal(np.asarray(y_bf16), np.asarray(y))
  (dp, dx), (dp_bf16, dx_bf16) = vjp(dy), vjp_bf16(dy)
  np.testing.assert_allclose(np.asarray(dx_bf16), np.asarray(dx), rtol=1e-5, atol=1e-5)
  rounded = x.astype(jnp.bfloat16).astype(jnp.float32)
  dp_rounded, _ = vjp_of(plain, rounded)[1](dy)
  kernel = lambda g: np.asarray(g["params"]["kernel"])
  np.testing.assert_allclose(kernel(dp_bf16), kernel(dp_rounded), rtol=1e-5, atol=1e-4)
  assert np.abs(kernel(dp_bf16) - kernel(dp)).max() > 1e-3  # the rounding is real


def test_slab_progress_tells_the_passes_apart(capsys):
  """Forward 0..3, then the backward pass's recomputation 3..0, then the next step."""
  from sdl.models import cosmoflow  # noqa: PLC0415
  cosmoflow._last_slab[0] = None
  for slab in (0, 1, 2, 3, 3, 2, 1, 0, 0, 1):
    cosmoflow._slab_progress(slab, 4)
  lines = capsys.readouterr().err.split()
  passes = [l for l in lines if l in ("forward:", "backward:")]
  assert passes == ["forward:"] * 4 + ["backward:"] * 4 + ["forward:"] * 2
  assert [l for l in lines if "/" in l] == ["1/4", "2/4", "3/4", "4/4"] * 2 + ["1/4", "2/4"]


def test_executed_flops_count_the_recompute_and_the_halos():
  """lbann 512³, stem of conv1, pool1, conv2, pool2. Recomputing the whole stem adds one
  forward of conv1 and conv2 (and a `remat` block, of its convolutions); 16 slabs compute 39 of conv1's 512 output planes and 17 of
  conv2's 256 per slab (test_slab_plan_covers_the_output_once), in the forward, the recompute and the
  backward (weight gradient for conv1; weight and input gradients for conv2)."""
  from sdl.bench import problems  # noqa: PLC0415
  conv1, conv2 = [c.valid_flops() for c in problems.cosmoflow_convs("lbann", 512, 1)[:2]]
  model = problems.cosmoflow_step_flops("lbann", 512, 1)
  executed = lambda **kw: problems.cosmoflow_executed_flops("lbann", 512, 1, **kw)
  assert executed() == model
  np.testing.assert_allclose(executed(slab_layers=4, stem_remat=True), model + conv1 + conv2)
  # `remat` blocks after the stem: a "full" block runs its convolutions forward once more,
  # a "save_convs" block none
  conv3, conv4 = [c.valid_flops() for c in problems.cosmoflow_convs("lbann", 512, 1)[2:4]]
  np.testing.assert_allclose(executed(slab_layers=4, stem_remat=True, remat=(
      ("conv3", "avgpool4", "full"),)), model + conv1 + conv2 + conv3 + conv4)
  assert executed(remat=(("conv1", "avgpool4", "save_convs"),)) == model
  want = model + conv1 * (3 * 16 * 39 / 512 - 2) + conv2 * (4 * 16 * 17 / 256 - 3)
  np.testing.assert_allclose(executed(slab_layers=4, slabs=16), want)
  p = slabs.plan([l.window for l in feature_layers("lbann", 512)[:4]], 512, 16)
  assert (p.lengths[1], p.lengths[3]) == (39, 17)
