"""The notebooks: committed without outputs, and each runs top to bottom (with its tiny
settings, `notebooks/run.py`'s TINY) in a real Jupyter kernel without an error. The
notebooks assert their own results (a sharded step against one device, a read-back
against the data written, ...), so running them checks them."""
import glob
import importlib.util
import os

import nbformat
import pytest

from sdl import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("notebook_runner",
                                               os.path.join(ROOT, "notebooks", "run.py"))
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


def read(name: str):
  return nbformat.read(runner.path_of(name), as_version=4)


def test_every_notebook_is_run_and_has_tiny_settings():
  found = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))}
  assert found == set(runner.NOTEBOOKS) == set(runner.TINY)


@pytest.mark.parametrize("name", runner.NOTEBOOKS)
def test_committed_notebook_is_valid_stripped_and_set_up_first(name):
  """Outputs are not committed: they would show one machine's timings and go stale with
  every change. The executed copies, with their plots, come from `notebooks/run.py`."""
  nb = read(name)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "one cell tagged 'parameters'"
  names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
           if "=" in line and not line.startswith((" ", "#"))}
  assert set(runner.TINY[name]) <= names, "TINY sets only what the parameters cell defines"
  source = "\n".join(c.source for c in code)
  if "ensure_cpu_devices" in source:  # virtual devices: asked for before JAX starts
    first = code[0].source
    assert "ensure_cpu_devices(" in first
    jax_at = first.find("import jax")
    assert jax_at == -1 or first.index("ensure_cpu_devices(") < jax_at
    assert source.index("ensure_cpu_devices(") == first.index("ensure_cpu_devices(")


@pytest.mark.parametrize("name", runner.NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
  # The kernel gets the suite's compilation cache and compile level (SDL_FAST_COMPILE, also
  # for notebooks that start JAX before sdl.process.configure could), not its virtual-device
  # flags: the notebook asks for its own devices, as it does on a user's machine.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = xla_flags.with_defaults("", None, xla_flags.fast_compile_requested())
  nb, _ = runner.execute(runner.path_of(name), runner.TINY[name],
                         out=str(tmp_path / f"{name}.ipynb"), env=env)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, "each notebook tells its story with at least one plot"
