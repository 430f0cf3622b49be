#!/usr/bin/env python3
"""The README's two set-up commands, needing nothing but Python (>= 3.11) and pip.

    python3 dev.py demo    # create/update .venv, train CosmoFlow on 4 virtual CPU devices
    python3 dev.py test    # create/update .venv, run the whole test suite

Each command (re)installs the project into ./.venv when pyproject.toml changed since the
last install, then runs inside that environment. Extra arguments are passed through, e.g.
`python3 dev.py demo --config.train.steps=50` or `python3 dev.py test -k mesh`.
`--python=PATH` (first) builds the environment with another interpreter. A `.venv` made by
another Python version, or left half-installed, is rebuilt.
"""
from __future__ import annotations  # annotations stay unevaluated on an old Python

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".sdl-installed"
MINIMUM = (3, 11)
NEWER = ("python3.13", "python3.12", "python3.11")


def version_of(python: str) -> tuple[int, int] | None:
  """(major, minor) of the interpreter `python`, or None if it does not run."""
  try:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return tuple(int(v) for v in out.split())
  except (OSError, subprocess.SubprocessError, ValueError):
    return None


def too_old(version, python: str, command: str) -> str | None:
  """The message for an interpreter older than MINIMUM (None if it will do)."""
  if version is not None and version >= MINIMUM:
    return None
  found = next((p for p in NEWER if shutil.which(p)), None)
  have = "does not run" if version is None else f"is Python {version[0]}.{version[1]}"
  fix = (f"run `{found} dev.py {command}`, or `python3 dev.py --python={shutil.which(found)} "
         f"{command}`" if found else
         "install Python 3.11 or newer (Debian/Ubuntu: `apt-get install python3.11 "
         "python3.11-venv`; or pyenv), then run `python3.11 dev.py " + command + "`")
  return f"dev.py: sdl needs Python >= 3.11, and {python} {have}; {fix}"


def venv_version() -> tuple[int, int] | None:
  """The Python version `.venv` was made with (from its pyvenv.cfg), or None."""
  try:
    for line in (VENV / "pyvenv.cfg").read_text().splitlines():
      key, _, value = line.partition("=")
      if key.strip() in ("version", "version_info"):
        return tuple(int(v) for v in value.strip().split(".")[:2])
  except (OSError, ValueError):
    pass
  return None


def ensure_venv(python: str, version: tuple[int, int]) -> None:
  wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() + f" py{version}"
  if STAMP.exists() and STAMP.read_text() == wanted and PY.exists():
    return
  if VENV.exists() and (venv_version() != version or version_of(str(PY)) != version):
    print(f"dev.py: {VENV} was made by another Python or is broken; rebuilding it", flush=True)
    shutil.rmtree(VENV)
  if not PY.exists():
    print(f"dev.py: creating {VENV} with {python}", flush=True)
    subprocess.check_call([python, "-m", "venv", str(VENV)])
  print("dev.py: installing sdl and its dependencies into .venv (first time: ~2 min)", flush=True)
  subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
  subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"])
  STAMP.write_text(wanted)


# Debian packages the speech part uses: text-to-speech engines (their voices make the
# diarization data) and alsa-utils' spoken sample WAVs (the MFCC tests' real recording).
SYSTEM_PACKAGES = {"espeak-ng": "/usr/bin/espeak-ng", "flite": "/usr/bin/flite",
                   "festival": "/usr/bin/text2wave",
                   "festvox-kallpc16k": "/usr/share/festival/voices/english/kal_diphone",
                   "festvox-us-slt-hts": "/usr/share/festival/voices/us/cmu_us_slt_arctic_hts",
                   "alsa-utils": "/usr/share/sounds/alsa/Front_Center.wav"}


def ensure_system_packages() -> None:
  """Install the missing SYSTEM_PACKAGES with apt-get where this runs as root; elsewhere
  say the command (the tests that need one fail naming it)."""
  missing = [name for name, path in SYSTEM_PACKAGES.items() if not os.path.exists(path)]
  if not missing:
    return
  command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
  if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
    print(f"dev.py: the speech part needs Debian packages: sudo {' '.join(command)}",
          file=sys.stderr, flush=True)
    return
  print(f"dev.py: installing {' '.join(missing)} (apt-get)", flush=True)
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  subprocess.call(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
  if subprocess.call(command, env=env, stdout=subprocess.DEVNULL):
    print(f"dev.py: apt-get failed; run: {' '.join(command)}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
  python = sys.executable
  if argv and argv[0].startswith("--python="):
    python, argv = argv[0].split("=", 1)[1], argv[1:]
  if not argv or argv[0] not in ("demo", "test"):
    print(__doc__)
    return 2
  command, rest = argv[0], argv[1:]
  version = tuple(sys.version_info[:2]) if python == sys.executable else version_of(python)
  message = too_old(version, python, command)
  if message:
    print(message, file=sys.stderr)
    return 2
  ensure_venv(python, version)
  if command == "test":
    ensure_system_packages()
  if command == "demo":
    args = [str(PY), "-m", "experiments.cosmoflow", "--workdir=runs/demo", *rest]
  else:
    args = [str(PY), "-m", "pytest", "-q", *test_workers(rest), *rest]
  return subprocess.call(args, cwd=ROOT)


GIB_PER_WORKER = 6  # the heaviest test files peak at about 4 GiB of RSS


def test_workers(rest: list[str]) -> list[str]:
  """pytest-xdist's flags: one worker per core, as many as the memory holds, each test
  file on one worker (its module fixtures are built once). Most tests compile more than
  they compute, and XLA compiles on one thread, so two workers on 2 cores take the suite
  about 40 % less time (docs/benchmarks.md, "Test suite"). None when `rest` chooses
  (`-n`, `-p no:xdist`)."""
  if any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist" for a in rest):
    return []
  try:
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
  except (AttributeError, ValueError, OSError):  # no sysconf (Windows): go by the cores
    memory_gib = float("inf")
  workers = int(min(os.cpu_count() or 1, memory_gib // GIB_PER_WORKER))
  return ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
