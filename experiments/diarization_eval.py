r"""Diarization error rates on held-out voices: trained models against each other and
against two floors, with bootstrap intervals; the window count × lookahead sweep; the
streaming real-time factor on one core.

    python -m experiments.diarization_eval --workdirs=runs/diar_axial,runs/diar_sa_eend \
        [--split=test] [--mixtures=100] [--sweep] [--rtf] [--out=runs/diarization_eval]

For each model (a training workdir or an exported model directory, trained by
`experiments.diarization`) and each floor, on the `--split` mixtures of the first model's
data config (`test`: base voices training never saw; `variants`: new rate/pitch variants of
training voices): DER at collar 0 and 0.5 (pyannote's total width: md-eval's 0.25),
overlap scored, pooled over mixtures, with a 95 % percentile bootstrap interval over
mixtures; then the ratio of the first model's DER to the second's with its interval.
SA-EEND is also scored its own way, each recording as one sequence (no windows, no
stitching).

Floors: `one speaker` (a single speaker talking over the whole recording) and `VAD +
k-means` (speech where the frame's log energy is above the midpoint of its 10th and 90th
percentiles; speech frames clustered into the config's speaker count by k-means on
MFCCs 1-12; a 5-frame median filter).

`--sweep`: the first model's DER (collar 0.5) for windows before the current one × lookahead
windows, as a table and `der_vs_context.png`. `--rtf`: streaming inference of one mixture
in a child process pinned to one core with one XLA thread: the real-time factor (compute
s per s of audio) and the latency (window + lookahead + compute per window).
"""
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Training workdirs or model directories.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "variants", "val"], "Mixtures scored.")
_MIXTURES = flags.DEFINE_integer("mixtures", 0, "Score the first N mixtures (0: all).")
_SWEEP = flags.DEFINE_bool("sweep", False, "DER against window count and lookahead.")
_SWEEP_PREV = flags.DEFINE_list("sweep_prev", ["1", "2", "4", "6"], "Windows before.")
_SWEEP_AHEAD = flags.DEFINE_list("sweep_ahead", ["0", "1", "2"], "Lookahead windows.")
_RTF = flags.DEFINE_bool("rtf", False, "Streaming real-time factor on one core.")
_OUT = flags.DEFINE_string("out", "runs/diarization_eval", "Where the PNG goes.")
_RTF_CHILD = flags.DEFINE_string("rtf_child", None, "(internal) model dir to time.")


def model_dir_of(path: str) -> str:
  from experiments.trainers import diarization as trainer  # noqa: PLC0415
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return trainer.export(path, os.path.join(path, "model"))
  return path


def data_config(path: str):
  """The data config a training workdir was run with."""
  from ml_collections import ConfigDict  # noqa: PLC0415
  with open(os.path.join(path, "config.json")) as f:
    return ConfigDict(json.load(f))


def vad_kmeans(features: np.ndarray, speakers: int, frame_s: float, seed: int = 0) -> list:
  """The VAD + k-means floor's turns for MFCC frames [frames, n_cepstra] (c0 = log
  energy)."""
  from sdl.train import diarize  # noqa: PLC0415
  energy = features[:, 0]
  lo, hi = np.percentile(energy, [10, 90])
  speech = energy > (lo + hi) / 2
  x = features[speech, 1:13]
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  rng = np.random.default_rng(seed)
  centres = x[rng.choice(len(x), speakers, replace=False)] if len(x) >= speakers else None
  activity = np.zeros((len(features), speakers), np.float32)
  if centres is None:
    return []
  for _ in range(30):
    assign = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), 1)
    centres = np.stack([x[assign == k].mean(0) if (assign == k).any() else centres[k]
                        for k in range(speakers)])
  activity[np.flatnonzero(speech), assign] = 1.0
  return diarize.segments(diarize.median_filter(activity, 5), frame_s)


def score_floor(name: str, recordings, config):
  from sdl.train import der  # noqa: PLC0415
  scorer = der.Scorer()
  for r in recordings:
    if name == "one speaker":
      hyp = [(0, 0.0, r.seconds)]
    else:
      hyp = vad_kmeans(r.features, config.data.speakers, config.features.hop_s)
    scorer.add(r.segments, hyp, r.seconds)
  return scorer


def row(name, scorer) -> str:
  cells = []
  for collar in (0.0, 0.5):
    lo, hi = scorer.bootstrap(collar)
    cells.append(f"{100 * scorer.der(collar):.2f} % [{100 * lo:.1f}, {100 * hi:.1f}]")
  return f"| {name} | " + " | ".join(cells) + " |"


def rtf_child(model_dir: str) -> None:
  """Stream one test mixture on one core; print a JSON line of timings."""
  import time  # noqa: PLC0415

  from experiments.trainers import diarization as trainer  # noqa: PLC0415
  from sdl.data import diarization as data  # noqa: PLC0415
  from sdl.train import diarize  # noqa: PLC0415
  predict, config, spec = trainer.load_exported(model_dir)
  cfg = data.mfcc_config(config.features)
  rng = np.random.default_rng(0)
  from sdl.data import mixtures, speech  # noqa: PLC0415
  pool = [[speech.synthetic_utterance(v, rng, cfg.sample_rate) for _ in range(6)] for v in (1, 2)]
  mix = mixtures.simulate(pool, ["a", "b"], rng, rate=cfg.sample_rate, beta=2.0)
  features = data.mfcc_function(cfg)
  window = spec.window_frames * cfg.hop_length
  warm = diarize.Streamer(predict, spec, cfg, features)
  for start in range(0, len(mix.audio), window):  # compile every shape the stream uses
    warm.push(mix.audio[start:start + window])
  warm.finish()
  streamer = diarize.Streamer(predict, spec, cfg, features)
  per_window = []
  for start in range(0, len(mix.audio), window):
    t = time.perf_counter()
    streamer.push(mix.audio[start:start + window])
    per_window.append(time.perf_counter() - t)
  t = time.perf_counter()
  streamer.finish()
  total = sum(per_window) + time.perf_counter() - t
  seconds = len(mix.audio) / cfg.sample_rate
  print(json.dumps({"audio_s": seconds, "compute_s": total, "rtf": total / seconds,
                    "window_s": window / cfg.sample_rate,
                    "lookahead_s": spec.windows_ahead * window / cfg.sample_rate,
                    "compute_per_window_s": float(np.median(per_window)),
                    "cpu": sorted(os.sched_getaffinity(0))}))


def rtf(model_dir: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                                     + " --xla_cpu_multi_thread_eigen=false"
                                     " intra_op_parallelism_threads=1").strip(),
         "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
  out = subprocess.run(["taskset", "-c", "0", sys.executable, "-m",
                        "experiments.diarization_eval", f"--rtf_child={model_dir}"],
                       capture_output=True, text=True, env=env, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax's restore chatter
  if _RTF_CHILD.value:
    return rtf_child(_RTF_CHILD.value)
  from experiments.trainers import diarization as trainer  # noqa: PLC0415
  from sdl.train import der  # noqa: PLC0415
  if not _WORKDIRS.value:
    raise app.UsageError("--workdirs=DIR[,DIR]: the trained models")
  config = data_config(_WORKDIRS.value[0])
  recordings = trainer.load_split(config, _SPLIT.value)
  if _MIXTURES.value:
    recordings = recordings[:_MIXTURES.value]
  hours = sum(r.seconds for r in recordings) / 3600
  print(f"{len(recordings)} {_SPLIT.value} mixtures ({hours:.2f} h)\n")
  print("| system | DER, collar 0 [95 % CI] | DER, collar 0.5 [95 % CI] |\n|---|---|---|")
  scorers = []
  for path in _WORKDIRS.value:
    predict, model_config, _ = trainer.load_exported(model_dir_of(path))
    scorer = trainer.score(predict, recordings, model_config, progress=path)
    scorers.append(scorer)
    print(row(f"{model_config.model.name} ({os.path.basename(path.rstrip('/'))})", scorer),
          flush=True)
    if model_config.model.name == "sa_eend":  # its own way: the whole recording at once
      whole = trainer.score(predict, recordings, model_config, progress=f"{path}, one grid",
                            one_grid=True)
      print(row(f"sa_eend, whole recording as one sequence ({os.path.basename(path)})",
                whole), flush=True)
  for floor in ("one speaker", "VAD + k-means"):
    print(row(floor, score_floor(floor, recordings, config)), flush=True)
  if len(scorers) >= 2:
    for collar in (0.0, 0.5):
      ea, ta = der.error_totals(scorers[0].per_recording, collar)
      eb, tb = der.error_totals(scorers[1].per_recording, collar)
      lo, hi = der.bootstrap_ratio(ea, ta, errors_b=eb, totals_b=tb)
      print(f"\nDER ratio {os.path.basename(_WORKDIRS.value[0])} / "
            f"{os.path.basename(_WORKDIRS.value[1])} at collar {collar}: "
            f"{scorers[0].der(collar) / max(scorers[1].der(collar), 1e-12):.3f} "
            f"[{lo:.3f}, {hi:.3f}]")
  if _SWEEP.value:
    sweep(_WORKDIRS.value[0], recordings)
  if _RTF.value:
    for path in _WORKDIRS.value:
      print(f"\nstreaming on one core, {os.path.basename(path)}: {rtf(model_dir_of(path))}")


def sweep(path: str, recordings) -> None:
  from experiments.trainers import diarization as trainer  # noqa: PLC0415
  from sdl.train import export  # noqa: PLC0415
  model_dir = model_dir_of(path)
  params, spec = export.read(model_dir, "a diarization model", "experiments.diarize --export")
  _, config, _ = trainer.load_exported(model_dir)
  module = trainer.module_of(config)
  prevs, aheads = [int(p) for p in _SWEEP_PREV.value], [int(a) for a in _SWEEP_AHEAD.value]
  table = np.zeros((len(prevs), len(aheads)))
  print("\n| windows before \\ lookahead | " + " | ".join(map(str, aheads)) + " |")
  print("|---|" + "---|" * len(aheads))
  for i, p in enumerate(prevs):
    fn = trainer.predictor(module, p)
    predict = lambda x, m, fn=fn: fn(params, x, m)
    for j, a in enumerate(aheads):
      grid = trainer.grid_spec(config, inference=True, prev=p, ahead=a)
      table[i, j] = trainer.score(predict, recordings, config, grid,
                                  progress=f"sweep {p} before, {a} ahead").der(0.5)
    print(f"| {p} (K = {p + 1}..{p + 1 + aheads[-1]}) | "
          + " | ".join(f"{100 * d:.2f} %" for d in table[i]) + " |", flush=True)
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415
  os.makedirs(_OUT.value, exist_ok=True)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  seconds = config.grid.window_frames * config.features.hop_s
  for j, a in enumerate(aheads):
    ax.plot(prevs, 100 * table[:, j], "o-", label=f"lookahead {a} window(s) ({a * seconds:g} s)")
  ax.set_xlabel(f"windows before the current one ({seconds:g} s each)")
  ax.set_ylabel("DER, collar 0.5 (%)")
  ax.set_title("Axial diarizer: DER against context")
  ax.legend()
  fig.tight_layout()
  png = os.path.join(_OUT.value, "der_vs_context.png")
  fig.savefig(png, dpi=120)
  print(f"wrote {png}")


if __name__ == "__main__":
  app.run(main)
