"""The diarization trainer, top to bottom: pseudo-speakers, simulated mixtures as MFCC
frames, grids of windows, the permutation-free loss, the generic loop, and DER on
held-out voices.

Batches: `train.batch_size` grids (K windows of C frames, `sdl.data.diarization.Crops`)
cut from random training mixtures, with speaker labels at the model's output rate; the
loss is EEND's permutation-free cross-entropy over every window of a grid. Evaluation
diarizes each validation mixture whole, window by window with the lookahead and stitched
speaker slots (`sdl.train.diarize`), and scores DER with pyannote.metrics at collar 0.5
(`eval_der`, md-eval's 0.25) and 0 (`eval_der_collar0`), overlap scored.
"""
import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np

from sdl import console
from sdl.data import diarization as data
from sdl.data import speech
from sdl.models import diarization as models
from sdl.optim import make_optimizer
from sdl.parallel import ConfigError, Partitioner, make_mesh
from sdl.train import der, diarize, loop
from sdl.train import export as export_lib
from sdl.train.checkpoint import abstract_like
from sdl.train.losses import permutation_free_bce
from sdl.train.step import Model, TrainState, init_state, make_train_step

SPLITS = ("train", "val", "test", "variants")


def validate(config) -> None:
  loop.check_train_config(config)
  d, g, m = config.data, config.grid, config.model
  if d.source not in ("tts", "synthetic"):
    raise ConfigError(f"data.source={d.source!r}: choose tts or synthetic")
  if not 1 <= d.speakers <= 4:
    raise ConfigError(f"data.speakers={d.speakers}: diarize 1 to 4 speakers a mixture")
  if d.rate != config.features.rate:
    raise ConfigError(f"features.rate={config.features.rate} differs from data.rate="
                      f"{d.rate}; set both to the rate the mixtures are made at")
  subsample = int(np.prod(m.strides)) if m.name == "axial" else m.subsample
  if g.window_frames % subsample:
    raise ConfigError(f"grid.window_frames={g.window_frames} is not a multiple of the "
                      f"model's subsampling ({subsample}); make it one")
  for name, section in (("grid", g), ("eval", config.eval)):
    if m.name == "axial" and (section.windows_prev > m.max_prev
                              or section.windows_ahead > m.max_ahead):
      raise ConfigError(f"{name}.windows_prev={section.windows_prev} / windows_ahead="
                        f"{section.windows_ahead}: the model learns offsets up to "
                        f"model.max_prev={m.max_prev} / max_ahead={m.max_ahead}; raise those")
  if config.eval.windows_prev < 1:
    raise ConfigError("eval.windows_prev=0: stitching a window's speakers to the last one's "
                      "needs at least one window before it")


def grid_spec(config, inference: bool = False, prev: int | None = None,
              ahead: int | None = None) -> diarize.GridSpec:
  """The training grid, or (`inference`) the one diarizing uses: `eval.windows_prev` /
  `windows_ahead` unless `prev` / `ahead` say otherwise."""
  m = config.model
  subsample = int(np.prod(m.strides)) if m.name == "axial" else m.subsample
  g = config.eval if inference else config.grid
  return diarize.GridSpec(config.grid.window_frames,
                          g.windows_prev if prev is None else prev,
                          g.windows_ahead if ahead is None else ahead, subsample)


def speaker_sets(config) -> dict[str, list[speech.Speaker]]:
  """{split: speakers}: training speakers for train; base voices training never saw for
  val and test; new rate/pitch variants of training voices for `variants`."""
  d = config.data
  if d.source == "synthetic":
    n_train, n_test = d.synthetic_voices
    voices = lambda lo, hi: [speech.Speaker("synthetic", str(v)) for v in range(lo, hi)]
    held = voices(n_train, n_train + n_test)
    variants = [speech.Speaker("synthetic", s.voice, 1.1, 0.93) for s in voices(0, n_train)]
    return {"train": voices(0, n_train), "val": held, "test": held, "variants": variants}
  from experiments.configs.diarization import TEST_VOICES, TRAIN_VOICES  # noqa: PLC0415
  train = speech.pseudo_speakers(TRAIN_VOICES)
  held = speech.pseudo_speakers(TEST_VOICES)
  variants = speech.pseudo_speakers(TRAIN_VOICES, rates=(0.93,), pitches=(1.1,))
  return {"train": train, "val": held, "test": held, "variants": variants}


def write_utterances(config) -> None:
  """The tts source's utterance files (every split's speakers), made where missing."""
  if config.data.source != "tts":
    return
  everyone = {s.name: s for split in speaker_sets(config).values() for s in split}
  speech.write_utterances(config.data.utterances, list(everyone.values()),
                          config.data.utterances_per_voice, config.data.rate, config.seed)


def load_split(config, split: str, keep_audio: int = 0) -> list[data.Recording]:
  d = config.data
  speakers = speaker_sets(config)[split]
  count = {"train": d.train_mixtures, "val": d.val_mixtures, "test": d.test_mixtures,
           "variants": d.variant_mixtures}[split]
  pool = data.SpeakerPool(speakers, d.utterances, d.rate)
  seed = [config.seed, SPLITS.index(split)]
  paths = data.write_mixtures(os.path.join(d.path, split), pool, count,
                              int(np.random.SeedSequence(seed).generate_state(1)[0]), d,
                              config.features, keep_audio)
  return [data.load(p) for p in paths]


def loss_fn(logits, batch):
  loss, _ = permutation_free_bce(logits, batch["labels"], batch["frame_mask"])
  return loss, {}


@dataclasses.dataclass(frozen=True)
class Compiled:
  init_state: Callable[[], TrainState]
  train_step: Callable
  predict: Callable  # (params, grids, window_mask) -> probabilities
  schedule: Callable
  abstract_state: TrainState


def module_of(config):
  fields = {k: v for k, v in config.model.items() if k != "name"}
  return models.make(config.model.name, config.data.speakers, **fields)


def build(config, example: dict) -> Compiled:
  mesh = make_mesh((1,), ("data",), devices=jax.devices()[:1])
  part = Partitioner.create(mesh, {"batch": "data"})
  module = module_of(config)
  prev = config.grid.windows_prev
  model = Model(module, inputs=lambda b: (b["features"], b["window_mask"]),
                kwargs=lambda rng, train: {"windows_prev": prev, "train": train,
                                           **({"rngs": {"dropout": rng}} if train else {})})
  optimizer = make_optimizer(config.optim, config.train.steps)
  init = lambda: init_state(model, optimizer.tx, example, config.seed)
  state_shape = jax.eval_shape(init)
  state_sharding = part.state_shardings(state_shape)
  step = make_train_step(model, loss_fn, optimizer.tx, skip_nonfinite=config.train.skip_nonfinite)
  return Compiled(jax.jit(init, out_shardings=state_sharding),
                  jax.jit(step, donate_argnums=0, static_argnums=2),
                  predictor(module, config.eval.windows_prev),
                  optimizer.schedule, abstract_like(state_shape, state_sharding))


def predictor(module, windows_prev: int) -> Callable:
  """The jitted `(params, grids, window_mask) -> speaker probabilities`."""
  return jax.jit(lambda params, x, mask: jax.nn.sigmoid(
      module.apply({"params": params}, x, mask, windows_prev)))


def hypothesis(features, predict: Callable, spec: diarize.GridSpec, hop_s: float, evals,
               one_grid: bool = False) -> list:
  """A recording's hypothesis segments: whole-file inference (window by window, stitched;
  `one_grid`: the whole recording as one grid, SA-EEND's own way), median filter,
  threshold."""
  if one_grid:
    windows = diarize.cut_windows(features, spec)
    probs = np.asarray(predict(windows[None], np.ones((1, len(windows)), bool)))
    activity = probs.reshape(-1, probs.shape[-1])
  else:
    activity = diarize.diarize(features, predict, spec, evals.batch)
  activity = diarize.median_filter(activity, evals.median)
  return diarize.segments(activity, spec.subsample * hop_s, evals.threshold)


def score(predict: Callable, recordings, config, spec=None, progress: str = "",
          one_grid: bool = False) -> der.Scorer:
  """DER components of `predict`'s turns on `recordings` (a progress line per recording
  when `progress` names the work)."""
  spec, scorer = spec or grid_spec(config, inference=True), der.Scorer()
  for i, r in enumerate(recordings, 1):
    scorer.add(r.segments, hypothesis(r.features, predict, spec, config.features.hop_s,
                                      config.eval, one_grid), r.seconds)
    if progress:
      console.progress(f"{progress}: {i}/{len(recordings)} recordings",
                       final=i == len(recordings))
  return scorer


def evaluate(predict: Callable, recordings, config) -> dict:
  scorer = score(predict, recordings, config)
  return {"der": scorer.der(0.5), "der_collar0": scorer.der(0.0)}


def crops(config, recordings) -> data.Crops:
  spec = grid_spec(config)
  return data.Crops(recordings, config.train.batch_size, spec.window_frames, spec.windows,
                    spec.subsample, config.features.hop_s, config.seed, spec.windows_prev,
                    random_context=config.grid.random_context)


def run(config, workdir: str, *, hooks=()) -> TrainState:
  """Train as `config` says, in `workdir` (resuming if it holds checkpoints)."""
  validate(config)
  loop.check_workdir(workdir)
  write_utterances(config)
  train = load_split(config, "train")
  val = load_split(config, "val")
  batches = crops(config, train)
  c = build(config, batches(0))
  done = loop.finished(workdir, config, c.abstract_state)
  if done is not None:
    return done
  params = sum(x.size for x in jax.tree.leaves(c.abstract_state.params))
  print(f"{config.model.name} diarizer ({params:,} parameters) on {len(train)} training "
        f"mixtures; DER on {len(val)} held-out-voice mixtures", flush=True)
  predict = lambda p: lambda x, m: c.predict(p, x, m)
  return loop.fit(workdir=workdir, config=config, init_state=c.init_state,
                  abstract_state=c.abstract_state, train_step=c.train_step, get_batch=batches,
                  evaluate=lambda s: evaluate(predict(s.params), val, config),
                  schedule=c.schedule, hooks=hooks)


# --- a trained model as two small files, for `experiments.diarize` -------------------------

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
SHIPPED = os.path.join(MODELS, "diarization")


def export(workdir: str, out: str) -> str:
  """The latest checkpoint in `workdir` as `out/params.npz` and `out/model.json` (the
  model, features, grid and eval settings: what diarizing needs)."""
  config, state = export_lib.latest_state(workdir, lambda config: build(
      config, crops(config, [example_recording(config)])(0)).abstract_state)
  spec = {k: config[k].to_dict() for k in ("model", "features", "grid", "eval")}
  spec.update(speakers=config.data.speakers, step=int(state.step))
  return export_lib.write(out, state.params, spec, np.float16)  # half the size to ship


def example_recording(config) -> data.Recording:
  """A silent recording of one window: the shapes `build` needs."""
  frames = config.grid.window_frames
  return data.Recording("example", np.zeros((frames, config.features.n_cepstra), np.float32),
                        [], tuple(f"s{i}" for i in range(config.data.speakers)), 0.0, None,
                        config.features.rate)


def load_exported(directory: str):
  """(predict, spec, GridSpec, features config) of a model written by `export`."""
  from ml_collections import ConfigDict  # noqa: PLC0415

  params, spec = export_lib.read(directory, "a diarization model", "experiments.diarize "
                                 "--export")
  config = ConfigDict({"model": spec["model"], "data": {"speakers": spec["speakers"]},
                       "grid": spec["grid"], "features": spec["features"],
                       "eval": spec["eval"]})
  predict = predictor(module_of(config), config.eval.windows_prev)
  return (lambda x, m: predict(params, x, m)), config, grid_spec(config, inference=True)

