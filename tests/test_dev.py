"""dev.py refuses a Python that is too old, with the fix, and rebuilds a `.venv` made by
another interpreter or left half-installed."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dev  # noqa: E402


def test_too_old_a_python_is_refused_with_the_fix():
  message = dev.too_old((3, 10), "/usr/bin/python3.10", "test")
  assert "sdl needs Python >= 3.11, and /usr/bin/python3.10 is Python 3.10" in message
  assert "dev.py test" in message and ("--python=" in message or "apt-get install" in message)
  assert dev.too_old((3, 11), "python3", "demo") is None
  assert "does not run" in dev.too_old(None, "/nonexistent/python", "demo")


def test_the_command_refuses_an_interpreter_that_does_not_run():
  out = subprocess.run([sys.executable, str(ROOT / "dev.py"), "--python=/nonexistent/python",
                        "test"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "sdl needs Python >= 3.11" in out.stderr


@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
  venv = tmp_path / ".venv"
  monkeypatch.setattr(dev, "VENV", venv)
  monkeypatch.setattr(dev, "PY", venv / "bin" / "python")
  monkeypatch.setattr(dev, "STAMP", venv / ".sdl-installed")
  calls = []

  def check_call(args):
    calls.append(args)
    if args[1:3] == ["-m", "venv"]:  # what `python -m venv` leaves
      (venv / "bin").mkdir(parents=True)
      (venv / "bin" / "python").symlink_to(sys.executable)
      (venv / "pyvenv.cfg").write_text(f"version = {sys.version.split()[0]}\n")
  monkeypatch.setattr(dev.subprocess, "check_call", check_call)
  return venv, calls


def test_a_venv_of_another_python_is_rebuilt(fake_venv):
  venv, calls = fake_venv
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text("")  # a python 3.10 left behind, half-installed
  (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.10.12\n")
  version = tuple(sys.version_info[:2])
  dev.ensure_venv(sys.executable, version)
  assert calls[0] == [sys.executable, "-m", "venv", str(venv)]  # rebuilt from scratch
  assert dev.venv_version() == version and dev.STAMP.exists()
  calls.clear()
  dev.ensure_venv(sys.executable, version)  # installed and stamped: nothing to do
  assert calls == []
  dev.STAMP.unlink()  # an install that never finished: installed again, not rebuilt
  dev.ensure_venv(sys.executable, version)
  assert calls and all(c[1:3] != ["-m", "venv"] for c in calls)
