#!/usr/bin/env python3
"""The README's two set-up commands, needing nothing but Python and pip.

    python3 dev.py demo    # create/update .venv, train CosmoFlow on 4 virtual CPU devices
    python3 dev.py test    # create/update .venv, run the whole test suite

Each command (re)installs the project into ./.venv when pyproject.toml changed since the
last install, then runs inside that environment. Extra arguments are passed through, e.g.
`python3 dev.py demo --config.train.steps=50` or `python3 dev.py test -k mesh`.
"""
import hashlib
import os
import pathlib
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".sdl-installed"


def ensure_venv() -> None:
  wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
  if STAMP.exists() and STAMP.read_text() == wanted and PY.exists():
    return
  if not PY.exists():
    print(f"dev.py: creating {VENV}", flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
  print("dev.py: installing sdl and its dependencies into .venv (first time: ~2 min)", flush=True)
  subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
  subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"])
  STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in ("demo", "test"):
    print(__doc__)
    return 2
  ensure_venv()
  command, rest = argv[0], argv[1:]
  if command == "demo":
    args = [str(PY), "-m", "experiments.cosmoflow", "--workdir=runs/demo", *rest]
  else:
    args = [str(PY), "-m", "pytest", "-q", *rest]
  return subprocess.call(args, cwd=ROOT)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
