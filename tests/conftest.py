"""Eight fake CPU devices for every test, set before JAX starts its backend, and sdl's
CPU-process settings applied first, as the entry points do (`sdl.process.configure`)."""
import os

# The tests compile far more than they compute (tiny shapes, few steps): LLVM at -O1
# (`sdl.xla_flags`, SDL_FAST_COMPILE). Subprocess tests inherit it through the environment.
os.environ.setdefault("SDL_FAST_COMPILE", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

from sdl import process  # noqa: E402

process.configure()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Identical computations compiled by several tests (a trainer built again for another data
# source, a resumed run) are compiled once per session.
import tempfile  # noqa: E402

# Under pytest-xdist every worker of one run shares one cache (JAX writes its entries
# atomically), so a computation compiled by one worker is not compiled again by another.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
CACHE = (os.path.join(tempfile.gettempdir(), f"sdl-jax-cache-{_RUN}") if _RUN
         else tempfile.mkdtemp(prefix="sdl-jax-cache-"))
os.makedirs(CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", CACHE)
# Every compile is kept, the small ones too: a subprocess test's command compiles some forty
# small functions (slices, casts) that the next command would otherwise compile again.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# Subprocess tests (the command line, kill -9, SIGTERM) share the cache through the
# environment, so that each compiles what another already compiled only once.
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The longest test files first (pytest-xdist hands files to its workers in collection
# order, a file to a worker): a long file collected last would leave the other worker idle
# at the end. Listed by their measured time, longest first; the rest keep their order.
LONGEST_FIRST = ("test_multiprocess.py", "test_kfac.py", "test_train_cosmoflow.py",
                 "test_notebooks.py", "test_cosmoflow_model.py", "test_kfac_compare.py",
                 "test_reliability.py", "test_interruptions.py", "test_generic_trainer.py",
                 "test_cli.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
