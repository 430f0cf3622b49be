"""3D U-Net: the transposed convolution's CPU lowering, the layout validator, and every
sharded layout against one device (forward, gradients, BatchNorm statistics)."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.errors import ConfigError
from sdl.models.conv import ConvTranspose3D, conv_transpose3d_native, depth_to_space
from sdl.models.unet3d import UNet3D, blocks, check_layouts, resolve_layouts
from sdl.parallel import Partitioner, make_mesh


def test_depth_to_space_equals_numpy_and_flax():
  """Each input voxel paints a k³ cube of outputs (kernel taps flipped, as XLA's
  conv_transpose without transpose_kernel); flax's ConvTranspose agrees on its params."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 2, 4, 5)).astype(np.float32)
  kernel = rng.standard_normal((2, 2, 2, 5, 3)).astype(np.float32)
  expected = np.zeros((2, 6, 4, 8, 3))
  for i, j, l in np.ndindex(3, 2, 4):
    for a, b, e in np.ndindex(2, 2, 2):
      expected[:, 2 * i + a, 2 * j + b, 2 * l + e] = x[:, i, j, l] @ kernel[1 - a, 1 - b, 1 - e]
  np.testing.assert_allclose(depth_to_space(x, kernel), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(conv_transpose3d_native(x, kernel, (2, 2, 2)), expected,
                             rtol=1e-5, atol=1e-5)
  flax_module = nn.ConvTranspose(3, (2, 2, 2), (2, 2, 2), padding="VALID", use_bias=False)
  params = flax_module.init(jax.random.key(0), x)
  ours = ConvTranspose3D(3, lowering="folded")
  np.testing.assert_allclose(ours.apply(params, x), flax_module.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  # the same gradients through both lowerings
  grads = [jax.grad(lambda p, x: jnp.sum(ConvTranspose3D(3, lowering=lw).apply(p, x) ** 2),
                    argnums=(0, 1))(params, x) for lw in ("native", "folded")]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_lbann_parameter_count():
  """By hand: 3³ convs without bias, BatchNorm scale + bias, 2³ deconvs that keep their
  channels, a 1³ conv to 3 classes."""
  convs = [(1, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
           (256, 512), (512 + 256, 256), (256, 256), (256 + 128, 128), (128, 128),
           (128 + 64, 64), (64, 64)]
  expected = (sum(27 * i * o + 2 * o for i, o in convs)
              + sum(8 * c * c for c in (512, 256, 128)) + 64 * 3)
  shapes = jax.eval_shape(UNet3D(3).init, jax.random.key(0), jnp.zeros((1, 8, 8, 8, 1)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == expected


BLOCKS = blocks(((32, 64), (64, 128), (128, 256)), (256, 512))


@pytest.mark.parametrize("layouts,size,depth,height,message", [
    (("spatial",) * 6, 64, 2, 1, "model.layouts has 6 entries for 7 blocks"),
    (("spatial", "spatial", "split", "data", "data", "data", "data"), 64, 2, 1,
     r"model.layouts\[2\]='split' \(block down3\): choose one of"),
    (("spatial",) * 7, 32, 8, 1,
     r"model.layouts\[2\]='spatial': block down3 \(8³ voxels\) would run split along depth "
     r"over 8 devices, but 1 voxel\(s\) per shard is not a multiple of its stride 2; set it "
     r"to 'data' \(or use model.layouts='auto'\)"),
    (("depth", "depth", "data", "data", "data", "data", "data"), 16, 8, 1,
     r"model.layouts\[1\]='depth': block down2 \(8³ voxels\) would run split along depth "
     r"over 8 devices, but 1 voxel\(s\) per shard is not a multiple of its stride 2"),
    (("data",) * 3 + ("spatial",) + ("data",) * 3, 16, 4, 1,
     r"model.layouts\[3\]='spatial': block bottom \(2³ voxels\) would run split along depth "
     r"over 4 devices, but depth 2 over 4 shards leaves shards thinner than its halo of 1"),
    (("data",) * 6 + ("spatial",), 24, 1, 8,
     r"model.layouts\[6\]='spatial': block up1 \(24³ voxels\) would run split along height "
     r"over 8 devices, but the upsampling into it starts from 12 voxel\(s\), which do not "
     r"divide into 8 equal shards"),
    (("data",) * 7, 20, 1, 1, r"data.crop_size=20 must be divisible by 8"),
])
def test_layout_errors_name_the_field_and_block(layouts, size, depth, height, message):
  with pytest.raises(ConfigError, match=message):
    check_layouts(layouts, BLOCKS, size, depth, height)


def test_auto_layouts_split_every_block_that_can():
  assert resolve_layouts("auto", BLOCKS, 64, 4) == ("spatial",) * 7
  # 32³ over 8: down2 and up2 (16³) keep 2 planes a shard, enough for the halo and the
  # pool; down3 (8³) keeps 1, which the pool cannot halve, and up3 upsamples from 4³
  assert resolve_layouts("auto", BLOCKS, 32, 8) == (
      "spatial", "spatial", "data", "data", "data", "spatial", "spatial")
  # a height split that does not fit keeps the depth split alone
  assert resolve_layouts("auto", BLOCKS, 32, 2, 8)[:2] == ("spatial", "spatial")
  assert resolve_layouts("auto", BLOCKS, 32, 2, 8)[2] == "depth"
  with pytest.raises(ConfigError, match="model.layouts='everywhere'"):
    resolve_layouts("everywhere", BLOCKS, 32, 2)


# Tiny widths: the layouts, halos and statistics are what is tested, not the width.
DOWN, BOTTOM, SIZE, BATCH = ((4, 8), (8, 8)), (8, 8), 16, 4
VOLUME = ("batch", "depth", "height", None, None)


def train_forward(model, variables, x, labels):
  """Logits, parameter gradients and updated BatchNorm statistics of one training pass."""
  def loss(params):
    out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               x, train=True, mutable=["batch_stats"])
    logp = jax.nn.log_softmax(out)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)), (out, updates)
  (_, (out, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return out, grads, updates


@functools.cache
def reference():
  """One device, no partitioner, the same (CPU) lowerings. The classes are slabs along
  depth, so that they change inside and across the shards. With labels drawn voxel by voxel
  the BatchNorm-bias gradients are sums that cancel to ~1e-3 of their terms: there the
  single-device float32 result itself was 1.5e-5 from float64 (its reductions run over
  one long array; the 4 x 2 sharded one was 1.6e-6 from it), too close to the bound to
  tell a bug from rounding."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 2, (BATCH, SIZE, SIZE, SIZE, 1)).astype(np.float32)
  depth = np.arange(SIZE)[None, :, None, None]
  labels = np.broadcast_to((depth >= 6).astype(np.int32) + (depth >= 11), x.shape[:4])
  labels = np.ascontiguousarray(labels)
  variables = jax.jit(UNet3D(3, DOWN, BOTTOM).init)(jax.random.key(0), x[:1])
  model = UNet3D(3, DOWN, BOTTOM, conv_lowering="folded")
  return x, labels, variables, jax.jit(functools.partial(train_forward, model))(
      variables, x, labels)


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2), (2, 2, 2)])
def test_sharded_equals_single_device(shape):
  """Forward, gradients and updated BatchNorm statistics within 1e-5 (per leaf) of one
  device, with every block that can run split doing so; the compiled step gathers no
  activation of a split block (only the data-parallel blocks' own, where the layout
  changes)."""
  x, labels, variables, ref = reference()
  mesh = make_mesh(shape, ("data", "spatial", "spatial_h")[:len(shape)])
  part = Partitioner.create(mesh)
  layouts = resolve_layouts("auto", blocks(DOWN, BOTTOM), SIZE, shape[1],
                            part.axis_size("height"))
  model = UNet3D(3, DOWN, BOTTOM, layouts=layouts, partitioner=part, conv_lowering="folded")
  xs = jax.device_put(x, part.sharding(VOLUME))
  ys = jax.device_put(labels, part.sharding(VOLUME[:4]))
  step = jax.jit(functools.partial(train_forward, model)).lower(variables, xs, ys).compile()
  out = step(variables, xs, ys)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(ref)):
    assert rel(got, want) < 1e-5, jax.tree_util.keystr(path)

  split = [b for b, layout in zip(blocks(DOWN, BOTTOM), layouts) if layout != "data"]
  assert split and split[0].name == "down1"
  hlo = step.as_text()
  assert "collective-permute" in hlo  # the halos
  gathered = [tuple(int(d) for d in m.split(","))
              for m in re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} all-gather\(", hlo)]
  data_sides = [SIZE >> b.level for b, lay in zip(blocks(DOWN, BOTTOM), layouts)
                if lay == "data"]
  for dims in gathered:  # only activations of data-parallel blocks, at their own size
    assert len(dims) == 5 and dims[1] in data_sides, dims
  if "data" not in layouts:
    assert not gathered
