"""CosmoFlow networks: parameter counts, and sharded == single-device on fake devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.kernels import conv3d as direct_kernels
from sdl.models.cosmoflow import CosmoFlow, feature_layers, resolve_spatial_layers
from sdl.parallel import Partitioner, make_mesh
from sdl.parallel.sharding import VOLUME_AXES


def count_params(variant, size):
  model = CosmoFlow(variant, size)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, size, 4),
                                                                    jnp.int16))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_parameter_counts_at_128():
  # mlperf: convs 4,704,608 + dense 32768·128+128 + 128·64+64 + 64·4+4 (hand count)
  assert count_params("mlperf", 128) == 8_907_556  # "about 8.91 M"
  # lbann: convs (no bias) 4,715,712 + FC 2048·2048+2048 + 2048·256+256 + 256·4+4
  assert count_params("lbann", 128) == 9_437_636  # "about 9.44 M"


@pytest.mark.parametrize("size", [256, 512])
def test_lbann_extra_pools_keep_flattened_size(size):
  assert count_params("lbann", size) == 9_437_636
  kinds = [layer.kind for layer in feature_layers("lbann", size)]
  assert kinds.count("avgpool") == 5 + int(np.log2(size // 128))


def forward_and_grads(model, params, x, y):
  def loss(p):
    out = model.apply(p, x)
    return jnp.mean((out - y) ** 2), out
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return out, grads


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


SIZE, BATCH = 32, 8


@functools.cache
def reference(variant, lowering="native"):
  """One device, no partitioner: "native" is XLA's own conv and pooling."""
  rng = np.random.default_rng(0)
  x = rng.poisson(3.0, size=(BATCH, SIZE, SIZE, SIZE, 4)).astype(np.int16)
  y = rng.uniform(-1, 1, size=(BATCH, 4)).astype(np.float32)
  model = CosmoFlow(variant, SIZE, conv_lowering=lowering)
  params = CosmoFlow(variant, SIZE, conv_lowering="native").init(jax.random.key(1), x[:1])
  out, grads = jax.jit(functools.partial(forward_and_grads, model))(params, x, y)
  return x, y, params, out, grads


@pytest.mark.parametrize("variant", ["mlperf", "lbann"])
def test_folded_network_equals_native(variant):
  """The CPU lowerings against XLA's own ops through the whole network, on one device.

  Gradients through max pooling are compared on lbann only (average pooling). A max-pool
  window whose two largest inputs differ by about the forward's rounding (~3e-6 here)
  can pick a different first maximum in the two lowerings, and that one routing moves
  every gradient below it by ~1e-3. On the AVX-512 EPYC VM one window of mlperf's
  second pool did (found by comparing each window's argmax; the float32 native gradients
  were within 1e-6 of float64, so no lowering is wrong). `test_pooling` checks the
  routing itself, ties included, and `test_conv` each conv's gradients.
  """
  _, _, _, out, grads = reference(variant, "folded")
  _, _, _, ref_out, ref_grads = reference(variant, "native")
  assert rel_err(out, ref_out) < 1e-5
  if variant == "lbann":
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(ref_grads)):
      assert rel_err(g, g_ref) < 1e-5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("variant", ["mlperf", "lbann"])
@pytest.mark.parametrize("shape,lowering", [((1, 8), "folded"), ((2, 4), "native"),
                                            ((2, 4), "folded"), ((4, 2), "folded"),
                                            ((8, 1), "folded"), ((2, 2, 2), "folded")])
def test_sharded_equals_single_device(variant, shape, lowering):
  """Against the same lowering and kernels on one device; (2, 2, 2) also splits height and
  recomputes conv2..conv3 in the backward pass (a `remat` block, kept apart on CPU)."""
  from sdl import xla_flags  # noqa: PLC0415
  x, y, params, ref_out, ref_grads = reference(variant, lowering)
  mesh = make_mesh(shape, ("data", "spatial", "spatial_h")[:len(shape)])
  part = Partitioner.create(mesh)
  layers = resolve_spatial_layers(variant, SIZE, shape[1], part.axis_size("height"))
  remat = (("conv2", "conv3", "full"),) if len(shape) == 3 else ()
  model = CosmoFlow(variant, SIZE, spatial_layers=layers, partitioner=part,
                    conv_lowering=lowering, remat=remat)
  xs = jax.device_put(x, part.sharding(VOLUME_AXES))
  ys = jax.device_put(y, part.sharding(("batch", None)))
  ps = jax.device_put(params, part.replicated())
  step = jax.jit(functools.partial(forward_and_grads, model),
                 compiler_options=xla_flags.remat_compiler_options("cpu") if remat else None)
  out, grads = step(ps, xs, ys)
  assert rel_err(out, ref_out) < 1e-5
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(ref_grads)):
    assert rel_err(g, g_ref) < 1e-5, jax.tree_util.keystr(path)

  n_layers = len(feature_layers(variant, SIZE))
  hlo = step.lower(ps, xs, ys).compile().as_text()
  if shape[1] > 1:
    # The depth split is real: halos travel between neighbours, and layers past
    # `spatial_layers` were re-partitioned to data parallelism (which must happen here).
    assert "collective-permute" in hlo
    assert 0 < layers < n_layers
    if lowering == "folded":  # the fold runs per shard: no conv gathers its activations
      gathers = [line for line in hlo.splitlines() if "all-gather(" in line]
      assert not [line for line in gathers if "Conv3D" in line]
      # conv1 (4 channels) on each device's slab, where the kernel is used on this CPU
      direct = direct_kernels.use_direct((3, 3, 3, 4, 16), (1, 1, 1), SIZE, jnp.float32)
      assert (direct_kernels.FORWARD in hlo) == direct
  else:
    assert "collective-permute" not in hlo and layers == n_layers
  if variant == "lbann" and shape[1] == 2:
    # The strided conv4 (layer 7) runs depth-split on this mesh.
    assert feature_layers(variant, SIZE)[6].window.stride == 2 and layers >= 7


def test_remat_blocks_keep_parameters_and_gradients_and_recompute_on_cpu():
  """`remat` blocks change no parameter name, output or gradient; XLA:CPU keeps their
  recomputation (one more forward convolution per conv in a "full" block, none for
  "save_convs") only under `remat_compiler_options`, which XLA's own FLOP count and
  `cosmoflow_executed_flops` both see."""
  from sdl import xla_flags  # noqa: PLC0415
  from sdl.bench import problems  # noqa: PLC0415
  x, y, params, ref_out, ref_grads = reference("lbann")
  remat = (("conv2", "avgpool3", "full"), ("conv4", "avgpool4", "save_convs"))
  model = CosmoFlow("lbann", SIZE, conv_lowering="native", remat=remat)
  assert jax.tree.structure(model.init(jax.random.key(1), x[:1])) == jax.tree.structure(params)
  lowered = jax.jit(functools.partial(forward_and_grads, model)).lower(params, x, y)
  merged, kept = lowered.compile(), lowered.compile(xla_flags.remat_compiler_options("cpu"))
  out, grads = kept(params, x, y)
  assert rel_err(out, ref_out) < 1e-6
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(ref_grads)):
    assert rel_err(g, g_ref) < 1e-6, jax.tree_util.keystr(path)

  # The plain step: 7 forward convolutions, 7 weight and 6 input gradients (none for the
  # input volume). XLA:CPU's CSE merges the recomputation back into the forward pass
  # unless told not to; kept, conv2 and conv3 run forward once more.
  convs = lambda compiled: compiled.as_text().count(" convolution(")
  assert (convs(merged), convs(kept)) == (20, 22)
  counted = (problems.cosmoflow_executed_flops("lbann", SIZE, BATCH, remat=remat)
             - problems.cosmoflow_step_flops("lbann", SIZE, BATCH))
  conv2, conv3 = [c.valid_flops() for c in problems.cosmoflow_convs("lbann", SIZE, BATCH)[1:3]]
  assert counted == conv2 + conv3
  xla_flops = lambda compiled: compiled.cost_analysis()["flops"]
  np.testing.assert_allclose(xla_flops(kept) - xla_flops(merged), counted, rtol=0.02)


def test_fsdp_state_over_data_and_spatial_equals_single_device():
  """Parameters split over all 8 devices of a 2 x 4 data x spatial mesh: same outputs and
  gradients as one device, and the gradients come back split the same way."""
  x, y, params, ref_out, ref_grads = reference("lbann", "folded")
  part = Partitioner.create(make_mesh((2, 4), ("data", "spatial")), params="fsdp")
  model = CosmoFlow("lbann", SIZE, spatial_layers=resolve_spatial_layers("lbann", SIZE, 4),
                    partitioner=part, conv_lowering="folded")
  shardings = part.state_shardings(params)
  ps = jax.device_put(params, shardings)
  kernel = ps["params"]["Conv3D_5"]["kernel"]
  assert len({str(s.index) for s in kernel.addressable_shards}) == 8  # 8 distinct slices
  step = jax.jit(functools.partial(forward_and_grads, model), out_shardings=(None, shardings))
  out, grads = step(ps, jax.device_put(x, part.sharding(VOLUME_AXES)),
                    jax.device_put(y, part.sharding(("batch", None))))
  assert rel_err(out, ref_out) < 1e-5
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(ref_grads)):
    assert rel_err(g, g_ref) < 1e-5, jax.tree_util.keystr(path)
  assert grads["params"]["Conv3D_5"]["kernel"].sharding.is_equivalent_to(
      shardings["params"]["Conv3D_5"]["kernel"], 5)
  # Each split convolution gathers its own kernel, inside its shard_map, after its input.
  hlo = step.lower(ps, jax.device_put(x, part.sharding(VOLUME_AXES)),
                   jax.device_put(y, part.sharding(("batch", None)))).as_text()
  assert "all_gather" in hlo or "all-gather" in hlo


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
  x, y, params, ref_out, _ = reference("mlperf")
  model = CosmoFlow("mlperf", SIZE, dtype=jnp.bfloat16)
  out = jax.jit(model.apply)(params, x)
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      jax.eval_shape(model.init, jax.random.key(0), x[:1])))
  # bf16 has 8 mantissa bits: agreement to a few percent, but not to fp32 precision.
  err = rel_err(out, ref_out)
  assert 1e-6 < err < 5e-2


def test_dropout_only_in_training():
  x, _, params, ref_out, _ = reference("lbann")
  model = CosmoFlow("lbann", SIZE)
  a = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(0)})
  b = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert rel_err(a, b) > 1e-3
  np.testing.assert_allclose(model.apply(params, x, train=False), ref_out, rtol=1e-5, atol=1e-6)


def pooled_step(model, variables, x, y):
  """Training-mode forward (dropout off), gradients, and the updated batch statistics."""
  def loss(p):
    out, state = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), (out, state)
  (_, (out, state)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return out, grads, state


def test_pooled_head_pools_every_conv_and_splits_like_one_device():
  """The pooled head: its batch norm sees the spatial means of every convolution's leaky
  ReLU (numpy, from the captured conv outputs), and a 2 x 4 data x spatial mesh gives the
  outputs, gradients and batch statistics of one device.

  The trunk's activations and the batch statistics agree to 1e-5, the outputs and the head's
  gradients to 1e-4, but the convolutions' gradients only to 2e-2 (the first convolution's
  bias differs by 1.5e-3 here, where the flatten head's agree to 1e-5 on the same inputs).
  Our reading, not proven: through this head every voxel of every activation carries
  gradient (through the flatten head only those max pooling picks), including voxels whose
  pre-activation lies within rounding of the leaky ReLU's kink, where the two layouts can
  take different slopes (1 or 0.3); and the batch norm divides by the features' spread
  across the batch, which is small by design.
  """
  rng = np.random.default_rng(0)
  rates = np.linspace(3.0, 8.0, BATCH)[:, None, None, None, None]  # samples that differ
  x = rng.poisson(rates, size=(BATCH, SIZE, SIZE, SIZE, 4)).astype(np.int16)
  y = rng.uniform(-1, 1, size=(BATCH, 4)).astype(np.float32)
  model = CosmoFlow("mlperf", SIZE, conv_lowering="folded", dropout=0.0, head="pooled")
  variables = CosmoFlow("mlperf", SIZE, conv_lowering="native", head="pooled").init(
      jax.random.key(1), x[:1])
  assert variables["params"]["head_norm"]["scale"].shape == (32 + 64 + 128 + 256 + 512,)
  out, grads, state = jax.jit(functools.partial(pooled_step, model))(variables, x, y)

  _, captured = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  convs = [np.asarray(captured["intermediates"][f"Conv3D_{i}"]["__call__"][0], np.float64)
           for i in range(5)]
  features = np.concatenate([np.where(c > 0, c, 0.3 * c).mean((1, 2, 3)) for c in convs], -1)
  # momentum 0.9 from the initial (0, 1): one step moves the running mean to 0.1 x batch mean
  np.testing.assert_allclose(state["batch_stats"]["head_norm"]["mean"],
                             0.1 * features.mean(0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(state["batch_stats"]["head_norm"]["var"],
                             0.9 + 0.1 * features.var(0), rtol=1e-4)

  part = Partitioner.create(make_mesh((2, 4), ("data", "spatial")))
  sharded = CosmoFlow("mlperf", SIZE, spatial_layers=resolve_spatial_layers("mlperf", SIZE, 4),
                      partitioner=part, conv_lowering="folded", dropout=0.0, head="pooled")
  args = (jax.device_put(variables, part.replicated()),
          jax.device_put(x, part.sharding(VOLUME_AXES)),
          jax.device_put(y, part.sharding(("batch", None))))
  out_s, grads_s, state_s = jax.jit(functools.partial(pooled_step, sharded))(*args)
  _, captured_s = jax.jit(lambda v, x: sharded.apply(
      v, x, capture_intermediates=True, mutable=["intermediates"]))(*args[:2])
  for i, conv in enumerate(convs):
    assert rel_err(captured_s["intermediates"][f"Conv3D_{i}"]["__call__"][0], conv) < 1e-5
  assert rel_err(out_s, out) < 1e-4
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_s), jax.tree.leaves(state)):
    assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads)):
    conv = "Conv3D" in jax.tree_util.keystr(path)
    assert rel_err(a, b) < (2e-2 if conv else 1e-4), jax.tree_util.keystr(path)
  trained = {**variables, **state}
  # evaluation normalises with the running statistics: no batch dependence
  np.testing.assert_allclose(model.apply(trained, x[:2]), model.apply(trained, x)[:2],
                             rtol=1e-5, atol=1e-6)
