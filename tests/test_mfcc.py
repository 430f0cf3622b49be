"""MFCCs and log-mel energies (`sdl.ops.mfcc`) against python-speech-features 0.6, on a real
recording (alsa-utils' spoken "Front Center", 48 kHz), on text-to-speech (espeak-ng) and on
a generated chirp in noise: within the stated tolerances in float32, within 1e-6 in
float64; jitted and batched."""
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
import python_speech_features as psf

from sdl.ops import mfcc as mfcc_lib

REAL = "/usr/share/sounds/alsa/Front_Center.wav"
# float32 against the float64 reference, absolute, on features of magnitude up to ~70
MFCC_ATOL_F32, LOGMEL_ATOL_F32 = 5e-4, 2e-4


def real_recording():
  import soundfile
  if not os.path.exists(REAL):
    pytest.fail(f"{REAL} (a real recording) is missing: apt-get install -y alsa-utils "
                "(python3 dev.py test installs it where it runs as root)")
  x, rate = soundfile.read(REAL)
  return x, rate


def tts_recording(tmp_path):
  import soundfile
  if not shutil.which("espeak-ng"):
    pytest.fail("espeak-ng is missing: apt-get install -y espeak-ng (python3 dev.py test "
                "installs it where it runs as root)")
  wav = str(tmp_path / "tts.wav")
  subprocess.run(["espeak-ng", "-v", "en-us+f3", "-w", wav, "seven green houses by the sea"],
                 check=True)
  return soundfile.read(wav)


def chirp(rate=16000, seconds=1.3):
  t = np.arange(int(rate * seconds)) / rate
  rng = np.random.default_rng(0)
  x = np.sin(2 * np.pi * (100 + 1500 * t) * t) + 0.05 * rng.standard_normal(len(t))
  x[:400] = 0.0  # digital silence: the eps floor
  return x, rate


def reference(x, cfg: mfcc_lib.MfccConfig):
  kwargs = dict(samplerate=cfg.sample_rate, winlen=cfg.win_s, winstep=cfg.hop_s,
                nfilt=cfg.n_filters, nfft=cfg.fft_size, preemph=cfg.preemphasis,
                winfunc=np.hamming if cfg.window == "hamming"
                else (lambda n: np.ones(n)))
  energies, _ = psf.fbank(x, **kwargs)
  ceps = psf.mfcc(x, numcep=cfg.n_cepstra, ceplifter=cfg.lifter, appendEnergy=True, **kwargs)
  return np.log(energies), ceps


SIGNALS = ["real", "tts", "chirp"]


def signal(name, tmp_path):
  return {"real": real_recording, "tts": lambda: tts_recording(tmp_path), "chirp": chirp}[name]()


@pytest.mark.parametrize("name", SIGNALS)
def test_float32_within_stated_tolerances(name, tmp_path):
  x, rate = signal(name, tmp_path)
  cfg = mfcc_lib.MfccConfig(sample_rate=rate, n_filters=26, n_cepstra=13)
  want_logmel, want_mfcc = reference(x, cfg)
  x32 = x.astype(np.float32)
  got_mfcc = np.asarray(jax.jit(lambda s: mfcc_lib.mfcc(s, cfg))(x32))
  got_logmel = np.asarray(jax.jit(lambda s: mfcc_lib.log_mel(s, cfg))(x32))
  assert got_mfcc.dtype == np.float32 and got_mfcc.shape == want_mfcc.shape
  np.testing.assert_allclose(got_mfcc, want_mfcc, rtol=0, atol=MFCC_ATOL_F32)
  np.testing.assert_allclose(got_logmel, want_logmel, rtol=0, atol=LOGMEL_ATOL_F32)


@pytest.mark.parametrize("name", SIGNALS)
@pytest.mark.parametrize("window", ["hamming", "rect"])
def test_float64_within_1e_6(name, window, tmp_path):
  x, rate = signal(name, tmp_path)
  cfg = mfcc_lib.MfccConfig(sample_rate=rate, n_filters=40, n_cepstra=20, window=window)
  want_logmel, want_mfcc = reference(x, cfg)
  with jax.enable_x64(True):
    got_mfcc = np.asarray(jax.jit(lambda s: mfcc_lib.mfcc(s, cfg))(x))
    got_logmel = np.asarray(mfcc_lib.log_mel(x, cfg))
  assert got_mfcc.dtype == np.float64
  np.testing.assert_allclose(got_mfcc, want_mfcc, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got_logmel, want_logmel, rtol=0, atol=1e-6)


def test_batched_equals_one_at_a_time_and_pieces_continue():
  x, rate = chirp()
  cfg = mfcc_lib.MfccConfig(sample_rate=rate)
  batch = np.stack([x, x[::-1].copy(), 0.5 * x]).astype(np.float32)
  together = np.asarray(jax.jit(lambda s: mfcc_lib.mfcc(s, cfg))(batch))
  for row, want in zip(batch, together):
    np.testing.assert_allclose(np.asarray(mfcc_lib.mfcc(row, cfg)), want, atol=MFCC_ATOL_F32)
  # a stream's later piece, given the sample before it, gives the whole signal's frames
  hop, first = cfg.hop_length, 37
  start = first * hop
  piece = mfcc_lib.mfcc(batch[0, start:], cfg, previous=batch[0, start - 1])
  np.testing.assert_allclose(np.asarray(piece), together[0, first:], atol=MFCC_ATOL_F32)


def test_frame_count_and_filterbank_match_the_reference():
  cfg = mfcc_lib.MfccConfig(sample_rate=8000, n_filters=20)
  for n in (1, 199, 200, 201, 281, 8000):
    frames = psf.sigproc.framesig(np.ones(n), cfg.frame_length, cfg.hop_length)
    assert mfcc_lib.num_frames(n, cfg) == len(frames), n
  want = psf.get_filterbanks(20, cfg.fft_size, 8000, 0, None)
  np.testing.assert_allclose(mfcc_lib.mel_filterbank(cfg), want, atol=1e-12)
