"""ResNet v1.5 (He et al. 2016; stride in the 3x3 conv) with GroupNorm.

GroupNorm (Wu & He 2018) instead of BatchNorm keeps the model a pure function of
(params, input): no batch statistics to synchronise across data-parallel replicas or to
carry in the train state, and K-FAC's layer statistics see exactly the forward pass.
`ResNet50 = ResNet(stage_sizes=(3, 4, 6, 3))`; its norm scales and biases take K-FAC's
fallback, every convolution and the classifier are Kronecker-factored.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Bottleneck(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    norm = lambda: nn.GroupNorm(num_groups=min(32, self.features))
    y = nn.relu(norm()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
                use_bias=False)(y)
    y = nn.relu(norm()(y))
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False)(y)
    y = nn.GroupNorm(num_groups=min(32, 4 * self.features), scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      x = nn.Conv(4 * self.features, (1, 1), strides=self.strides, use_bias=False,
                  name="projection")(x)
      x = nn.GroupNorm(num_groups=min(32, 4 * self.features))(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Images `[n, H, W, 3]` → logits `[n, num_classes]`."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(32, self.width))(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = Bottleneck(self.width * 2 ** i, strides=2 if i > 0 and j == 0 else 1)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
