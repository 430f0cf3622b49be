"""A trained model as two small files a command can ship and load without the training
run: `params.npz` (the parameters, flattened by path) and `model.json` (what rebuilds and
feeds the model). Written atomically: a crash leaves the previous export or none."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdl.errors import ConfigError

FILES = ("model.json", "params.npz")


def write(out: str, params, spec: dict, dtype=None) -> str:
  """`params` (stored as `dtype` where given, e.g. float16 to halve a shipped model; read
  back as float32) and `spec` into directory `out`."""
  os.makedirs(out, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  cast = lambda v: np.asarray(v, dtype) if dtype is not None else np.asarray(v)
  tmp = os.path.join(out, f"params.{os.getpid()}.tmp.npz")
  np.savez(tmp, **{k: cast(v) for k, v in flat.items()})
  os.replace(tmp, os.path.join(out, "params.npz"))
  with open(os.path.join(out, "model.json.tmp"), "w") as f:
    json.dump(spec, f, indent=1, default=list)
  os.replace(os.path.join(out, "model.json.tmp"), os.path.join(out, "model.json"))
  return out


def read(directory: str, what: str, how: str):
  """(params, spec) written by `write`; `what` and `how` name the model and the command
  that exports one, for the error."""
  missing = [f for f in FILES if not os.path.exists(os.path.join(directory, f))]
  if missing:
    raise ConfigError(f"{directory}: not {what} (missing {', '.join(missing)}); give a "
                      f"directory written by {how}")
  with open(os.path.join(directory, "model.json")) as f:
    spec = json.load(f)
  with np.load(os.path.join(directory, "params.npz")) as f:
    params = traverse_util.unflatten_dict(
        {k: jnp.asarray(f[k], jnp.float32 if f[k].dtype.kind == "f" else None)
         for k in f.files}, sep="/")
  return params, spec


def latest_state(workdir: str, abstract_state_of):
  """(config, train state) of the latest checkpoint in the training `workdir`;
  `abstract_state_of(config)` gives the state's shapes and shardings to restore into."""
  from ml_collections import ConfigDict  # noqa: PLC0415

  from sdl.train.checkpoint import Checkpointer  # noqa: PLC0415
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1)
  try:
    meta = ckpt.read_meta()
    if meta is None:
      raise ConfigError(f"{workdir}: no checkpoint to export; train first")
    config = ConfigDict(meta["config"])
    state, _ = ckpt.restore(abstract_state_of(config))
  finally:
    ckpt.close()
  return config, state
