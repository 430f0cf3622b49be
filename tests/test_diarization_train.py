"""The diarization trainer end to end (the smoke variant: synthetic voices, no TTS): it
trains, a run killed after step 4 resumes bit-identically, its DER is pyannote's on the
model's own turns; the exported model diarizes a user's WAV file (any rate, stereo, 24-bit)
whole or streaming, to the same RTTM, and bad files get one clear error line."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile

from experiments.configs import diarization as configs
from experiments.trainers import diarization as trainer
from sdl.data import mixtures, speech
from sdl.train import diarize
from sdl.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(Exception):
  pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("diarization")
  config = configs.get_config("smoke")
  config.data.path = str(base / "data")
  straight = trainer.run(config, str(base / "straight"))
  return config, base, straight


def test_smoke_trains_and_resumes_bit_identically(trained, tmp_path):
  config, base, straight = trained
  cached = sorted(os.listdir(os.path.join(config.data.path, "train")))
  assert len(cached) == config.data.train_mixtures

  def crash_after_4(step, state):
    if step == 4:
      raise Crash
  workdir = str(tmp_path / "resumed")
  with pytest.raises(Crash):
    trainer.run(config, workdir, hooks=[crash_after_4])
  resumed = trainer.run(config, workdir)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  want = read_jsonl(str(base / "straight" / "metrics.jsonl"))
  assert [r["loss"] for r in records] == [r["loss"] for r in want]
  evals = [r for r in records if "eval_der" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(0 <= r["eval_der"] and 0 <= r["eval_der_collar0"] for r in evals)
  assert os.path.exists(os.path.join(workdir, "loss_curves.png"))


def test_evaluation_is_pyannotes_der_of_the_models_turns(trained):
  config, base, straight = trained
  val = trainer.load_split(config, "val")
  c = trainer.build(config, trainer.crops(config, val)(0))
  predict = lambda x, m: c.predict(straight.params, x, m)
  got = trainer.evaluate(predict, val, config)
  from pyannote.core import Annotation, Segment, Timeline
  from pyannote.metrics.diarization import DiarizationErrorRate
  metric = DiarizationErrorRate(collar=0.5)
  spec = trainer.grid_spec(config, inference=True)
  for r in val:
    ref, hyp = Annotation(), Annotation()
    for i, (s, a, b) in enumerate(r.segments):
      ref[Segment(a, b), i] = f"r{s}"
    turns = trainer.hypothesis(r.features, predict, spec, config.features.hop_s, config.eval)
    for i, (s, a, b) in enumerate(turns):
      hyp[Segment(a, b), i] = f"h{s}"
    metric(ref.support(), hyp, uem=Timeline([Segment(0, r.seconds)]))
  assert got["der"] == pytest.approx(abs(metric))


def run_diarize(*args):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "experiments.diarize", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


def test_diarize_command_reads_any_wav_whole_or_streaming_and_rejects_bad_files(
    trained, tmp_path):
  config, base, _ = trained
  model = str(tmp_path / "model")
  out = run_diarize(f"--checkpoint={base / 'straight'}", f"--export={model}")
  assert out.returncode == 0, out.stderr
  rng = np.random.default_rng(0)
  pool = [[speech.synthetic_utterance(v, rng, 44100) for _ in range(3)] for v in (1, 2)]
  mix = mixtures.simulate(pool, ["a", "b"], rng, rate=44100, beta=0.5,
                          utterances_per_speaker=(2, 3))
  wav = str(tmp_path / "meeting.wav")
  soundfile.write(wav, np.stack([mix.audio, 0.8 * mix.audio], 1), 44100, subtype="PCM_24")
  whole = run_diarize(f"--checkpoint={model}", f"--wav={wav}", f"--out={tmp_path / 'w.rttm'}")
  assert whole.returncode == 0, whole.stderr
  assert "real-time factor" in whole.stderr
  stream = run_diarize(f"--checkpoint={model}", f"--wav={wav}", f"--out={tmp_path / 's.rttm'}",
                       "--stream")
  assert stream.returncode == 0, stream.stderr
  w, s = diarize.read_rttm(str(tmp_path / "w.rttm")), diarize.read_rttm(str(tmp_path / "s.rttm"))
  assert w == s and set(w) == {"meeting"}
  assert all(0 <= a < b <= len(mix.audio) / 44100 + 0.2 for _, a, b in w["meeting"])
  # bad inputs: one line naming the file and what is wrong, status 2
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "text.wav").write_text("not audio at all\n" * 20)
  soundfile.write(str(tmp_path / "short.wav"), np.zeros(100, np.float32), 16000)
  for name, words in [("missing.wav", "no such file"), ("empty.wav", "empty"),
                      ("text.wav", "not an audio file"), ("short.wav", "at least")]:
    bad = run_diarize(f"--checkpoint={model}", f"--wav={tmp_path / name}")
    assert bad.returncode == 2, (name, bad.stderr)
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last and words in last, last
