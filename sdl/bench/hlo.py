"""What a compiled program's collectives carry, read from its HLO text."""
import math
import re

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str, op: str = "all-reduce") -> int:
  """Bytes of every `op` result in an HLO module's text (each instruction once, in
  whichever computation: branches of a conditional included)."""
  total = 0
  for line in hlo_text.splitlines():
    m = re.search(rf"=\s*(.*?)\s{re.escape(op)}(?:-start)?\(", line)
    if not m:
      continue
    for dtype, dims in _SHAPE.findall(m.group(1)):
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total
