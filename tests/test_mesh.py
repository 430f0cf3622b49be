"""Meshes from config and the validation that runs before anything compiles."""
import jax
import pytest

from experiments.configs import cosmoflow as cosmoflow_configs
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.parallel.sharding import VOLUME_AXES
from sdl.parallel.spatial import Window, check_spatial_plan, max_spatial_layers
from experiments.trainers.cosmoflow import validate


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2), (8, 1), (2, 2, 2), (-1, 2)])
def test_mesh_shapes_and_auto_axes(shape):
  axes = ("data", "spatial", "spatial_h")[:len(shape)]
  mesh = make_mesh(shape, axes)
  expected = tuple(8 // 2 if s == -1 else s for s in shape)
  assert tuple(mesh.shape.values()) == expected
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_volume_sharding_maps_logical_axes():
  part = Partitioner.create(make_mesh((2, 2, 2), ("data", "spatial", "spatial_h")))
  assert tuple(part.spec(VOLUME_AXES)) == ("data", "spatial", "spatial_h", None, None)
  # A mesh without spatial_h leaves height whole.
  part = Partitioner.create(make_mesh((4, 2), ("data", "spatial")))
  assert tuple(part.spec(VOLUME_AXES)) == ("data", "spatial", None, None, None)
  x = jax.device_put(jax.numpy.zeros((4, 8, 8, 8, 4)), part.sharding(VOLUME_AXES))
  assert x.addressable_shards[0].data.shape == (1, 4, 8, 8, 4)


def smoke(**overrides):
  config = cosmoflow_configs.get_config("smoke")
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


def test_valid_config_resolves_plan():
  plan = validate(smoke(mesh__shape=(2, 4), train__batch_size=4, model__variant="mlperf"), 8)
  assert plan.mesh_shape == (2, 4) and plan.depth_shards == 4 and plan.data_shards == 2
  # 32³ mlperf over 4 depth shards: conv1 (8/shard) pool1 conv2 (4) pool2 conv3 (2) pool3
  # conv4 (1 voxel/shard, halo 1: allowed) then pool4 (1 voxel, stride 2) cannot split.
  assert plan.spatial_layers == 7


@pytest.mark.parametrize("overrides, message", [
    ({"mesh__shape": (2, 2)}, r"mesh.shape \(2, 2\) needs 4 devices but 8 are available"),
    ({"mesh__shape": (-1, 3)}, r"mesh.shape \(-1, 3\).*do not divide the 8 available devices"),
    ({"mesh__shape": (2, 4), "mesh__axes": ("data",)}, r"mesh.axes \('data',\) has 1"),
    ({"mesh__shape": (4, 2), "train__batch_size": 6},
     r"train.batch_size=6 is not divisible by the 'data' mesh axis \(4 devices\)"),
    ({"mesh__shape": (1, 8), "data__input_size": 36, "data__universe_size": 36},
     r"data.input_size=36 is not divisible by the 'spatial' mesh axis \(8 devices\)"),
    ({"mesh__shape": (1, 8), "model__variant": "mlperf", "model__spatial_layers": "7"},
     r"model.spatial_layers=7: layer 6 \(maxpool3 k2 s2\) .* 1 voxel\(s\) per shard is not a "
     r"multiple of its stride 2; set model.spatial_layers<=5"),
    ({"mesh__shape": (1, 8), "model__variant": "lbann", "model__spatial_layers": "6"},
     r"layer 6 \(avgpool3 k3 s2\).*not a multiple of its stride 2; set model.spatial_layers<=5"),
    ({"mesh__shape": (2, 4), "train__batch_size": 4, "model__variant": "vgg"},
     r"model.variant='vgg': choose one of \('mlperf', 'lbann'\)"),
    ({"mesh__shape": (2, 4), "train__batch_size": 4, "model__compute_dtype": "float16"},
     r"model.compute_dtype='float16'"),
])
def test_validation_errors_name_field_and_fix(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate(smoke(**overrides), 8)


def test_shards_thinner_than_halo_are_refused():
  # A k5 'same' conv needs 2 neighbouring slices; 8 voxels over 8 shards leaves 1 each.
  conv5 = Window("conv k5", 5, 1, (2, 2))
  check_spatial_plan([conv5], 16, 8, 1)  # 2 per shard: fine
  with pytest.raises(ConfigError, match=r"layer 1 \(conv k5\).*depth 8 over 8 shards leaves "
                     r"shards thinner than its halo of 2; set model.spatial_layers<=0"):
    check_spatial_plan([conv5], 8, 8, 1)
  # Deeper in a network: after a pool, the k5 conv gets 8 voxels over 8 shards.
  conv3, pool = Window("conv k3", 3, 1, (1, 1)), Window("pool", 2, 2, (0, 0))
  assert max_spatial_layers([conv3, pool, conv5], 16, 8) == 2
  with pytest.raises(ConfigError, match=r"layer 3 \(conv k5\).*depth 8 over 8 shards leaves "
                     r"shards thinner than its halo of 2; set model.spatial_layers<=2"):
    check_spatial_plan([conv3, pool, conv5], 16, 8, 3)


@pytest.mark.parametrize("variant, devices", [("default", 8), ("lbann", 4), ("large", 8),
                                              ("demo", 4), ("smoke", 2)])
def test_every_config_variant_validates(variant, devices):
  config = cosmoflow_configs.get_config(variant)
  plan = validate(config, devices)
  assert plan.spatial_layers >= 1  # every variant really splits depth
  with pytest.raises(ValueError, match="unknown cosmoflow config variant 'huge'"):
    cosmoflow_configs.get_config("huge")


def test_fsdp_splits_state_over_every_device_else_over_data():
  mesh = make_mesh((2, 4), ("data", "spatial"))
  part = Partitioner.create(mesh)
  tree = {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 32, 256), "float32"),
          "odd": jax.ShapeDtypeStruct((4098, 3), "float32"),     # 4098 = 2 x 2049
          "bias": jax.ShapeDtypeStruct((256,), "float32")}
  shardings = part.state_shardings(tree, "fsdp")
  # the largest dimension that 8 divides, over both axes: one 32-column slice per device
  assert tuple(shardings["kernel"].spec) == (None, None, None, None, ("data", "spatial"))
  assert shardings["kernel"].shard_shape(tree["kernel"].shape) == (3, 3, 3, 32, 32)
  assert tuple(shardings["odd"].spec) == ("data", None)  # no dimension divides by 8
  assert shardings["bias"].is_fully_replicated           # below FSDP_MIN_SIZE
  spatial_only = Partitioner.create(make_mesh((1, 8), ("data", "spatial")))
  kernel = spatial_only.state_shardings(tree, "fsdp")["kernel"]
  assert tuple(kernel.spec) == (None, None, None, None, "spatial")
  assert all(s.is_fully_replicated for s in part.state_shardings(tree).values())


def test_a_rule_may_split_the_batch_over_several_mesh_axes():
  """("batch", ("node", "local")): the batch over both, as one split of 4; a mesh that has
  only one of them gets that one; sizes, specs, FSDP's fallback and errors follow."""
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from sdl.parallel.sharding import describe_rule, logical_size, mesh_rules  # noqa: PLC0415
  rules = mesh_rules([["batch", ["node", "local"]], ["depth", "spatial"]])
  assert rules == (("batch", ("node", "local")), ("depth", "spatial"))
  part = Partitioner.create(make_mesh((2, 2, 2), ("node", "local", "spatial")), dict(rules))
  assert part.mesh_axis("batch") == ("node", "local") and part.axis_size("batch") == 4
  assert part.spec(VOLUME_AXES) == P(("node", "local"), "spatial", None, None, None)
  one = Partitioner.create(make_mesh((4, 2), ("local", "spatial")), dict(rules))
  assert one.mesh_axis("batch") == "local" and one.mesh_axes("batch") == ("local",)
  assert logical_size(rules, ("node", "local", "spatial"), (3, 2, 2), "batch") == 6
  assert logical_size(rules, ("local", "spatial"), (4, 2), "batch") == 4
  assert describe_rule(("node", "local")) == "the ('node', 'local') mesh axes"
  assert describe_rule("data") == "the 'data' mesh axis"
  # FSDP: over all 8 devices where a dimension divides by 8, else over node x local
  fsdp = Partitioner.create(part.mesh, dict(rules), "fsdp")
  assert fsdp.fsdp_spec((64, 128)) == P(None, ("node", "local", "spatial"))
  assert fsdp.fsdp_spec((12, 1030)) == P(("node", "local"), None)
  config = cosmoflow_configs.get_config("smoke")
  config.mesh.update(shape=(2, 2, 2), axes=("node", "local", "spatial"), rules=rules)
  config.train.batch_size = 6
  with pytest.raises(ConfigError, match=r"train.batch_size=6 is not divisible by the "
                     r"\('node', 'local'\) mesh axes \(4 devices\)"):
    validate(config, 8)
  config.train.batch_size = 4
  assert validate(config, 8).data_shards == 4
