"""Per-device memory of a compiled step, from XLA's own buffer assignment."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes per device of one compiled executable."""
  arguments: int
  outputs: int
  aliased: int     # outputs written in place of donated arguments
  temporaries: int

  @property
  def total(self) -> int:
    """Live at the peak: inputs, outputs not aliased onto inputs, and scratch."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def footprint(compiled) -> Footprint:
  """`compiled` is a `jax.stages.Compiled` (e.g. `jax.jit(f).lower(...).compile()`)."""
  m = compiled.memory_analysis()
  return Footprint(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))
