"""Logical axis names → mesh axes.

Model code names the axes of its activations logically (`batch`, `depth`, `height`,
`width`, `channels`); a `Partitioner` maps them onto a mesh with rules that are
configuration (`config.mesh.rules`, as maxtext's logical-axis rules). By default volumes
are NDHWC with batch over `data`, depth over `spatial`, height over `spatial_h` when the
mesh has it. XLA's SPMD partitioner then inserts the halo exchanges that convolutions over
a split depth axis need.

Parameters and optimiser state follow `config.mesh.params`: "replicated" (every device
holds all of it), or "fsdp" (each leaf split along its largest dimension that divides
evenly over all the mesh's devices, data and spatial axes alike, else over the data axis,
as in fully sharded data parallelism / ZeRO-3; XLA gathers a parameter where a layer needs
it whole and reduce-scatters its gradient). Under spatial partitioning the replicated
parameters and Adam moments are the part of each device's memory that does not shrink
with the split; "fsdp" makes it shrink too.
"""
import dataclasses
import math
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
PARAM_SHARDINGS = ("replicated", "fsdp")
FSDP_MIN_SIZE = 2 ** 12  # smaller leaves (biases, scalars) stay replicated


def mesh_rules(rules) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
  """`config.mesh.rules` as plain strings: each logical axis onto one mesh axis, or onto a
  tuple of them (the batch over `("node", "local")`)."""
  name = lambda target: str(target) if isinstance(target, str) else tuple(map(str, target))
  return tuple((str(logical), name(target)) for logical, target in rules)


def rule_targets(target: str | Sequence[str] | None) -> tuple[str, ...]:
  """A rule's mesh axes as a tuple."""
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def describe_rule(target: str | Sequence[str] | None) -> str:
  """"the 'data' mesh axis" or "the ('node', 'local') mesh axes", for error messages."""
  targets = rule_targets(target)
  return (f"the '{targets[0]}' mesh axis" if len(targets) == 1
          else f"the {targets} mesh axes")


def logical_size(rules, axes: Sequence[str], shape: Sequence[int], logical: str) -> int:
  """Devices that `rules` split `logical` over on a mesh of `axes` and `shape` (a rule's
  axes that this mesh lacks count 1)."""
  sizes = dict(zip(axes, shape))
  return math.prod(sizes.get(a, 1) for a in rule_targets(dict(rules).get(logical)))


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """Maps logical axes to a mesh; hashable so it can be a Flax module field."""
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, str | tuple[str, ...]], ...] = DEFAULT_RULES
  params: str = "replicated"  # how parameters are laid out: PARAM_SHARDINGS

  @classmethod
  def create(cls, mesh, rules: Mapping[str, str] | None = None,
             params: str = "replicated") -> "Partitioner":
    if params not in PARAM_SHARDINGS:
      raise ValueError(f"mesh.params={params!r}: choose one of {PARAM_SHARDINGS}")
    rules = tuple(dict(rules).items()) if rules is not None else DEFAULT_RULES
    return cls(mesh, rules, params)

  def mesh_axis(self, logical: str | None) -> str | tuple[str, ...] | None:
    """Mesh axis for a logical axis, or None when unmapped or absent from this mesh. A rule
    may name several mesh axes (`("batch", ("node", "local"))`: the batch over nodes and
    the devices within each); those this mesh has come back as a tuple, or one name."""
    target = dict(self.rules).get(logical)
    if isinstance(target, (tuple, list)):
      present = tuple(a for a in target if a in self.mesh.axis_names)
      return present if len(present) > 1 else (present[0] if present else None)
    return target if target in self.mesh.axis_names else None

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    """`mesh_axis` as a tuple: () when unmapped."""
    axis = self.mesh_axis(logical)
    return () if axis is None else (axis,) if isinstance(axis, str) else axis

  def axis_size(self, logical: str) -> int:
    return math.prod(self.mesh.shape[a] for a in self.mesh_axes(logical))

  def spec(self, logical: LogicalAxes) -> PartitionSpec:
    return PartitionSpec(*(self.mesh_axis(name) for name in logical))

  def sharding(self, logical: LogicalAxes) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def constrain(self, x: jax.Array, logical: LogicalAxes) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.sharding(logical))

  def state_shardings(self, abstract_tree, mode: str | None = None):
    """A sharding for every leaf of `abstract_tree` (params, optimiser state): replicated,
    or "fsdp" (module docstring) over every mesh axis with more than one device; `mode`
    defaults to this partitioner's `params`."""
    mode = self.params if mode is None else mode
    if mode not in PARAM_SHARDINGS:
      raise ValueError(f"mesh.params={mode!r}: choose one of {PARAM_SHARDINGS}")
    spec = self.fsdp_spec if mode == "fsdp" else lambda shape: PartitionSpec()
    return jax.tree.map(
        lambda leaf: NamedSharding(self.mesh, spec(tuple(getattr(leaf, "shape", ())))),
        abstract_tree)

  def param_spec(self, shape: Sequence[int]) -> PartitionSpec:
    """Where a parameter of `shape` lives under this partitioner's `params` layout."""
    return self.fsdp_spec(tuple(shape)) if self.params == "fsdp" else PartitionSpec()

  def fsdp_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
    """The fsdp rule: the largest dimension that all devices divide, split over every
    mesh axis with more than one device; else over the data axis; else replicated."""
    axes = tuple(a for a in self.mesh.axis_names if self.mesh.shape[a] > 1)
    if not axes or math.prod(shape) < FSDP_MIN_SIZE:
      return PartitionSpec()
    batch = self.mesh_axes("batch")
    for over in [axes] + ([batch] if batch and set(batch) < set(axes) else []):
      shards = math.prod(self.mesh.shape[a] for a in over)
      dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d])
              if shape[d] % shards == 0]
      if dims:
        spec = [None] * len(shape)
        spec[dims[0]] = over if len(over) > 1 else over[0]
        return PartitionSpec(*spec)
    return PartitionSpec()
