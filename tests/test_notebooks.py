"""Notebooks run end to end (they are percent-format scripts)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_universes_notebook_runs_and_plots(tmp_path):
  out = subprocess.run([sys.executable, "notebooks/universes.py", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "θ = {'omega_m'" in out.stdout
  png = (tmp_path / "universes.png").read_bytes()
  assert png[:4] == b"\x89PNG" and len(png) > 50_000
