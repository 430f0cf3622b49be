"""Per-device memory of a compiled step, from XLA's own buffer assignment.

`footprint` reads the totals (`Compiled.memory_analysis()`). `peak_buffers` says where
they go: it compiles once more with XLA's dump on, reads the buffers live at the peak
from its live-range report, and names each by its HLO value, shape, JAX op and the line
of this repository's code that made it (from the HLO's stack frames).
"""
import dataclasses
import os
import pathlib
import re
import tempfile


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


@dataclasses.dataclass(frozen=True)
class PeakBuffer:
  """One HLO value live at the step's memory peak."""
  value: str   # HLO instruction (a parameter for inputs)
  bytes: int
  shape: str
  op: str      # JAX's op name (name stack), or the argument's path for inputs
  source: str  # file:line (function) of the innermost frame in this repository, or ""


_ROOT = pathlib.Path(__file__).resolve().parents[2]


def peak_buffers(lowered, top: int | None = None) -> tuple[object, list[PeakBuffer]]:
  """Compile `lowered` (a `jax.stages.Lowered`) with XLA's dump on; returns the
  `Compiled` and the buffers live at its peak, largest first (`top` of them)."""
  with tempfile.TemporaryDirectory(prefix="sdl-memory-") as dump:
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump,
                                                 "xla_dump_hlo_as_text": True})
    reports = sorted(pathlib.Path(dump).glob("*-live-range.txt"),
                     key=lambda p: p.stat().st_size)
    if not reports:
      raise RuntimeError("XLA wrote no live-range report: this backend's compiler "
                         "may not dump one (XLA:CPU and XLA:GPU do)")
    live = reports[-1]  # the step's module (small helper modules may be dumped too)
    hlo = live.with_name(live.name.replace("-live-range.txt", ".txt"))
    assignment = live.with_name(live.name.replace("-live-range.txt", "-buffer-assignment.txt"))
    buffers = _peak(live.read_text(), hlo.read_text(), assignment.read_text())
  return compiled, buffers[:top] if top else buffers


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ")
_METADATA_OP = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")


def _peak(live_range: str, hlo: str, assignment: str) -> list[PeakBuffer]:
  lines = live_range.splitlines()
  start = next(i for i, line in enumerate(lines) if "(peak):" in line)
  values = []
  for line in lines[start + 1:]:
    m = re.match(r"\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes", line)
    if not m:
      break
    values.append((m.group(1), int(m.group(2))))
  info = {}
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group(1) not in info:
      op = _METADATA_OP.search(line)
      frame = _FRAME_ID.search(line)
      info[m.group(1)] = (m.group(2), op.group(1).replace("\\'", "'") if op else "",
                          int(frame.group(1)) if frame else None)
  where = _source_lines(hlo)
  # Values written in place of another (an elementwise op over its dead operand) share its
  # bytes: the live-range report lists both; count them once, named by the first.
  placed: dict[str, tuple[str, str]] = {}  # value -> (allocation, offset)
  allocation = None
  for line in assignment.splitlines():
    if m := re.match(r"allocation (\d+):", line):
      allocation = m.group(1)
    elif (m := re.match(r" value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})? @\d+> \(size=\d+,offset=(\d+)\)",
                        line)) and allocation is not None:
      placed.setdefault(m.group(1), (allocation, m.group(2)))
  out, seen = [], set()
  for value, size in values:
    slot = placed.get(value)
    if slot is not None:
      if slot in seen:
        continue
      seen.add(slot)
    shape, op, frame = info.get(value, ("?", "", None))
    out.append(PeakBuffer(value, size, shape, op, where(frame)))
  return sorted(out, key=lambda b: -b.bytes)


def _source_lines(hlo: str):
  """frame id → "file:line (function)" of its innermost frame under this repository."""
  sections: dict[str, dict[int, str]] = {}
  current = None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = sections.setdefault(line, {})
    elif current is not None and (m := re.match(r"(\d+) (.*)", line)):
      current[int(m.group(1))] = m.group(2)
    elif current is not None and line.strip():
      current = None
  files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
  functions = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
  field = lambda text, name: int(re.search(rf"{name}=(\d+)", text).group(1))

  def where(frame):
    seen = set()
    while frame and frame not in seen and frame in sections.get("StackFrames", {}):
      seen.add(frame)
      entry = sections["StackFrames"][frame]
      location = sections["FileLocations"][field(entry, "file_location_id")]
      path = files.get(field(location, "file_name_id"), "")
      if path.startswith(str(_ROOT)) and os.sep + ".venv" + os.sep not in path:
        return (f"{os.path.relpath(path, _ROOT)}:{field(location, 'line')} "
                f"({functions.get(field(location, 'function_name_id'), '?')})")
      parent = field(entry, "parent_frame_id")
      frame = None if parent == frame else parent
    return ""
  return where
