"""Logical axis names → mesh axes.

Model code names the axes of its activations logically (`batch`, `depth`, `height`,
`width`, `channels`); a `Partitioner` maps them onto a mesh. Volumes are NDHWC:
batch over `data`, depth over `spatial`, height over `spatial_h` when the mesh has it.
XLA's SPMD partitioner then inserts the halo exchanges that convolutions over a split
depth axis need.
"""
import dataclasses
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

VOLUME_AXES = ("batch", "depth", "height", "width", "channels")

DEFAULT_RULES = (
    ("batch", "data"),
    ("depth", "spatial"),
    ("height", "spatial_h"),
)

LogicalAxes = Sequence[str | None]


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """Maps logical axes to a mesh; hashable so it can be a Flax module field."""
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, str], ...] = DEFAULT_RULES

  @classmethod
  def create(cls, mesh, rules: Mapping[str, str] | None = None) -> "Partitioner":
    rules = tuple(dict(rules).items()) if rules is not None else DEFAULT_RULES
    return cls(mesh, rules)

  def mesh_axis(self, logical: str | None) -> str | None:
    """Mesh axis for a logical axis, or None when unmapped or absent from this mesh."""
    target = dict(self.rules).get(logical)
    return target if target in self.mesh.axis_names else None

  def axis_size(self, logical: str) -> int:
    axis = self.mesh_axis(logical)
    return 1 if axis is None else self.mesh.shape[axis]

  def spec(self, logical: LogicalAxes) -> PartitionSpec:
    return PartitionSpec(*(self.mesh_axis(name) for name in logical))

  def sharding(self, logical: LogicalAxes) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def constrain(self, x: jax.Array, logical: LogicalAxes) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.sharding(logical))
