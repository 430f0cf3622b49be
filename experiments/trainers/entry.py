"""The thin command line of a trainer: `--config` (file and `:variant`) and `--workdir`,
then `trainer.run(config, workdir)` once the CPU devices the config asks for exist."""
import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from sdl.parallel import ensure_cpu_devices


def main(trainer: str, default_config: str, default_workdir: str) -> None:
  """Define the flags and run `experiments.trainers.<trainer>.run` (call it under
  `if __name__ == "__main__"`)."""
  config_flag = config_flags.DEFINE_config_file(
      "config", default_config, "Config file (and :variant).", lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", default_workdir, "Checkpoints, metrics, plots.")

  def run(argv):
    del argv
    config = config_flag.value
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    ensure_cpu_devices(config.mesh.cpu_devices)  # before JAX starts its backend
    # jax-heavy: imported once the devices are set
    importlib.import_module(f"experiments.trainers.{trainer}").run(config, workdir_flag.value)
  app.run(run)
