"""Progress lines for long work: redrawn in place on a terminal, one line per update in a
log file (where `\\r` redraws pile up into one unreadable line)."""
import sys


def progress(text: str, *, final: bool, stream=None) -> None:
  """Show `text` as the current state of a long task; `final` ends its line."""
  stream = stream or sys.stderr
  if getattr(stream, "isatty", lambda: False)():
    print("\r" + text, end="\n" if final else "", file=stream, flush=True)
  else:
    print(text, file=stream, flush=True)
