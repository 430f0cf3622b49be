"""The memory and halo model of a data x spatial step against closed forms, the model's own
parameter count, and XLA's buffer assignment and collective-permutes."""
import jax
import pytest

from experiments.configs.cosmoflow import get_config
from experiments.trainers import cosmoflow
from experiments.trainers.memory import volume_model_rows
from sdl.bench import volume_model
from sdl.parallel.spatial import Window


def test_halo_planes_follow_the_window():
  assert volume_model.halo_planes(Window("conv", 3, 1, (1, 1))) == (1, 1)
  assert volume_model.halo_planes(Window("avgpool", 3, 2, (1, 1))) == (1, 0)
  assert volume_model.halo_planes(Window("maxpool", 2, 2, (0, 0))) == (0, 0)
  assert volume_model.halo_planes(Window("conv5", 5, 1, (2, 2))) == (2, 2)


def test_halo_and_activation_bytes_in_closed_form():
  stages = [volume_model.Stage(Window("c1", 3, 1, (1, 1)), 8, 3 ** 3 * 4 * 8),
            volume_model.Stage(Window("c2", 3, 1, (1, 1)), 16, 3 ** 3 * 8 * 16),
            volume_model.Stage(Window("p", 2, 2, (0, 0)), 16)]
  plan = volume_model.Plan(side=16, channels=4, batch=2, splits=4, spatial_layers=2)
  # forward: 2 planes of c1's input (16² x 4) and of c2's (16² x 8); backward, c2 only:
  # 2 planes of its output cotangent (16² x 16); float32, 2 examples
  assert volume_model.halo_bytes(stages, plan) == 2 * 4 * 2 * 16 * 16 * (4 + 8 + 16)
  # the input and c1, c2 split 4 ways, the pool's output whole
  want = (16 ** 3 * (4 + 8 + 16) / 4 + 8 ** 3 * 16) * 2 * 4
  assert volume_model.activation_bytes(stages, plan) == want
  assert volume_model.halo_bytes(stages, volume_model.Plan(16, 4, 2, 1, 2)) == 0


@pytest.mark.parametrize("variant", ["lbann", "mlperf"])
def test_cosmoflow_stages_count_the_networks_parameters(variant):
  config = get_config("smoke")
  config.model.variant = variant
  config.mesh.shape = (1, 1)
  plan = cosmoflow.validate(config, 1)
  module = cosmoflow.build_model(config, plan, None)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jax.numpy.zeros((1, 32, 32, 32, 4)), train=False))["params"]
  stages, head = volume_model.cosmoflow_stages(variant, 32)
  assert sum(s.params for s in stages) + sum(head) == sum(
      x.size for x in jax.tree.leaves(shapes))


def test_the_model_tracks_xlas_memory_and_halo_bytes():
  """CosmoFlow lbann at 32³ on 1 x P meshes: the model, its one parameter read at P = 1,
  within 25 % of XLA's per-device bytes at P = 2; its halo bytes at most 25 % above what
  the compiled step's collective-permutes send (it counts whole planes both ways)."""
  rows = volume_model_rows("lbann", 32, 1, [1, 2], "fsdp")
  assert rows[0]["model"] == pytest.approx(rows[0]["xla"])
  assert rows[0]["halo_hlo"] == rows[0]["halo_model"] == 0
  assert 0.8 < rows[1]["model"] / rows[1]["xla"] < 1.25, rows
  assert 1.0 <= rows[1]["halo_model"] / rows[1]["halo_hlo"] < 1.25, rows


def test_unet_stages_in_closed_form_and_the_networks_parameters():
  """One level (down (2,), bottom (4,)), 8³ x 1 channel, 3 classes, the down and bottom
  blocks depth-split 2 ways and the up block whole: every output and halo plane by hand;
  and LBANN's unet3d's stages hold exactly the built network's parameters."""
  stages, splits = volume_model.unet3d_stages(((2,),), (4,), 1, 3, ("depth", "depth", "data"),
                                              splits=2)
  # conv, pool; the bottom conv; deconv, concat, the up block's two convs; the 1³ classifier
  assert splits == (2, 2, 2, 1, 1, 1, 1, 1)
  plan = volume_model.Plan(8, 1, 1, 2, 0, stage_splits=splits)
  assert volume_model.sides(stages, 8) == [8, 4, 4, 8, 8, 8, 8, 8]
  assert [s.features for s in stages] == [2, 2, 4, 4, 6, 2, 2, 3]
  want = (8 ** 3 * 1 / 2 + 8 ** 3 * 2 / 2 + 4 ** 3 * 2 / 2 + 4 ** 3 * 4 / 2
          + 8 ** 3 * (4 + 6 + 2 + 2 + 3)) * 4
  assert volume_model.activation_bytes(stages, plan) == want
  # down1's conv reads 2 planes of its 8² x 1 input (no gradient to the volume); the bottom
  # conv 2 planes of its 4² x 2 input forward and of its 4² x 4 cotangent backward; the
  # pool, the deconv (stride = kernel) and the whole up block send nothing
  assert volume_model.halo_bytes(stages, plan) == (2 * 64 * 1 + 2 * 16 * 2 + 2 * 16 * 4) * 4

  from sdl.models.unet3d import LBANN_WIDTHS, UNet3D  # noqa: PLC0415
  module = UNet3D(classes=3)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                              jax.numpy.zeros((1, 16, 16, 16, 1))))["params"]
  stages, _ = volume_model.unet3d_stages(*LBANN_WIDTHS, 1, 3)
  assert sum(s.params for s in stages) == sum(x.size for x in jax.tree.leaves(shapes))
