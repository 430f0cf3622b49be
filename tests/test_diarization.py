"""Diarization parts: the permutation-free loss against a brute-force numpy reference, DER
by pyannote.metrics on hand-made cases with known answers, stitched sliding-grid inference,
streaming against whole-file inference, the simulated mixtures and their labels, and the
models' masking and sizes."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import diarization as configs
from experiments.trainers import diarization as trainer
from sdl.data import diarization as data
from sdl.data import mixtures, speech
from sdl.train import der, diarize
from sdl.train.losses import permutation_free_bce


def numpy_pit(logits, labels, mask):
  out = []
  for lo, la, m in zip(logits, labels, mask):
    p = 1 / (1 + np.exp(-lo.astype(np.float64)))
    best = np.inf
    for perm in itertools.permutations(range(lo.shape[-1])):
      y = la[..., list(perm)]
      xent = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(-1)
      best = min(best, (xent * m).sum() / max(m.sum(), 1))
    out.append(best)
  return np.mean(out)


@pytest.mark.parametrize("speakers", [2, 3])
def test_permutation_free_loss_is_the_best_permutation_and_ignores_speaker_order(speakers):
  rng = np.random.default_rng(speakers)
  logits = rng.standard_normal((3, 4, 5, speakers)).astype(np.float32)
  labels = (rng.random((3, 4, 5, speakers)) < 0.4).astype(np.float32)
  mask = (rng.random((3, 4, 5)) < 0.8).astype(np.float32)
  loss, best = permutation_free_bce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), numpy_pit(logits, labels, mask), rtol=1e-5)
  for perm in itertools.permutations(range(speakers)):
    again, _ = permutation_free_bce(jnp.asarray(logits), jnp.asarray(labels[..., list(perm)]),
                                    jnp.asarray(mask))
    np.testing.assert_allclose(float(again), float(loss), rtol=1e-6)
  # the labels' own permutation of perfect logits is found, with zero-ish loss
  perms = list(itertools.permutations(range(speakers)))
  shuffled = labels[..., list(perms[-1])]
  _, found = permutation_free_bce(jnp.asarray(200 * (2 * labels - 1)), jnp.asarray(shuffled),
                                  jnp.asarray(np.ones((3, 4, 5), np.float32)))
  for i in np.asarray(found):
    np.testing.assert_array_equal(shuffled[..., list(perms[i])], labels)


def test_der_oracle_hand_made_errors_collars_and_merging():
  ref = [(0, 0.0, 10.0), (1, 10.0, 20.0)]
  scorer = der.Scorer()
  assert scorer.add(ref, ref, 20.0)[0.0]["total"] == 20.0
  assert scorer.der(0.0) == 0.0 and scorer.der(0.5) == 0.0
  # speaker B stops 5 s early: 5 s missed of 20 s of speech, whatever the hypothesis' names
  missed = der.Scorer()
  missed.add(ref, [(1, 0.0, 10.0), (0, 10.0, 15.0)], 20.0)
  assert missed.der(0.0) == pytest.approx(0.25)
  # one speaker's label runs 5 s into the other's turn: 5 s of confusion
  confused = der.Scorer()
  confused.add(ref, [(0, 0.0, 15.0), (1, 15.0, 20.0)], 20.0)
  got = confused.per_recording[0][0.0]
  assert got["confusion"] == pytest.approx(5.0) and confused.der(0.0) == pytest.approx(0.25)
  # 0.2 s too long: a false alarm at collar 0, forgiven by a 0.5 s collar (±0.25 s)
  late = der.Scorer()
  late.add([(0, 0.0, 10.0)], [(0, 0.0, 10.2)], 12.0)
  assert late.der(0.0) == pytest.approx(0.02) and late.der(0.5) == pytest.approx(0.0)
  # overlapping segments of one speaker merge before scoring: 8 s of speech, not 10
  merged = der.Scorer()
  merged.add([(0, 0.0, 5.0), (0, 3.0, 8.0)], [(0, 0.0, 8.0)], 8.0)
  assert merged.per_recording[0][0.0]["total"] == pytest.approx(8.0) and merged.der(0.0) == 0


def test_bootstrap_interval_contains_the_pooled_der():
  rng = np.random.default_rng(0)
  totals = rng.uniform(50, 80, 40)
  errors = totals * rng.uniform(0.1, 0.3, 40)
  lo, hi = der.bootstrap_ratio(errors, totals)
  pooled = errors.sum() / totals.sum()
  assert lo < pooled < hi and hi - lo < 0.1
  lo, hi = der.bootstrap_ratio(errors, totals, errors_b=errors * 2, totals_b=totals)
  assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_stitching_recovers_speakers_from_grids_with_shuffled_slots():
  spec = diarize.GridSpec(window_frames=4, windows_prev=2, windows_ahead=1, subsample=1)
  rng = np.random.default_rng(1)
  truth = (rng.random((9 * 4, 3)) < 0.5).astype(np.float32)  # 9 windows, 3 speakers
  windows = truth.reshape(9, 4, 3)
  perms = list(itertools.permutations(range(3)))
  stitch = diarize.Stitcher(spec)
  for n in range(9):
    idx = np.clip(n - 2 + np.arange(4), 0, 8)
    grid = windows[idx][..., list(perms[rng.integers(len(perms))])]
    stitch.add(grid)
  got = stitch.activity()
  assert any(np.array_equal(got[:, list(p)], truth) for p in perms)


def tiny_model(config):
  c = trainer.build(config, trainer.crops(config, [trainer.example_recording(config)])(0))
  params = c.init_state().params
  return lambda x, m: c.predict(params, x, m)


def test_streaming_equals_whole_file_inference():
  config = configs.get_config("smoke")
  predict = tiny_model(config)
  spec = trainer.grid_spec(config, inference=True)
  cfg = data.mfcc_config(config.features)
  rng = np.random.default_rng(3)
  pool = data.SpeakerPool([speech.Speaker("synthetic", str(v)) for v in range(2)], None, 16000)
  mix = mixtures.simulate([pool.utterances(0), pool.utterances(1)], ["a", "b"], rng,
                          rate=16000, beta=0.5, utterances_per_speaker=(2, 3))
  whole = diarize.diarize(data.features_of(mix.audio, cfg), predict, spec, batch=4)
  streamer = diarize.Streamer(predict, spec, cfg, data.mfcc_function(cfg))
  emitted, at = [], 0
  while at < len(mix.audio):
    size = int(rng.integers(100, 6000))
    emitted += streamer.push(mix.audio[at:at + size])
    at += size
  emitted += streamer.finish()
  streamed = np.concatenate(emitted)
  assert streamed.shape == whole.shape
  np.testing.assert_allclose(streamed, whole, atol=1e-4)
  hop = spec.subsample * config.features.hop_s
  assert diarize.segments(streamed, hop) == diarize.segments(whole, hop)


def test_masked_windows_do_not_change_the_outputs():
  for variant in ("smoke", "smoke,sa_eend"):
    config = configs.get_config(variant)
    config.model.update(width=16, heads=2) if variant != "smoke" else None
    if variant != "smoke":
      config.model.update(hidden=32, depth=1)
    predict = tiny_model(config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 20, config.features.n_cepstra)).astype(np.float32)
    mask = np.array([[True, True, True, False], [False, True, True, True]])
    y = rng.standard_normal(x.shape).astype(np.float32)
    changed = np.where(mask[..., None, None], x, y)
    a, b = np.asarray(predict(x * mask[..., None, None], mask)), np.asarray(predict(changed, mask))
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-5)


def test_mixture_labels_overlap_and_snr():
  rate = 8000
  rng = np.random.default_rng(0)
  tone = lambda f, s: (0.5 * np.sin(2 * np.pi * f * np.arange(int(rate * s)) / rate)).astype(
      np.float32)
  pools = [[tone(300, 1.0), tone(300, 0.5)], [tone(700, 0.7)]]
  mix = mixtures.simulate(pools, ["a", "b"], rng, rate=rate, beta=1.0,
                          utterances_per_speaker=(3, 3), snrs=(10,), noises=("white",))
  assert len(mix.segments) == 6 and mix.snr_db == 10
  hop = 0.01
  labels = mix.activity(len(mix.audio) // 80, hop)
  # an independent count: a frame is overlapped where both speakers' segments cover it
  centres = (np.arange(len(labels)) + 0.5) * hop
  cover = [np.any([(s <= centres) & (centres < e) for k, s, e in mix.segments if k == spk],
                  axis=0) for spk in (0, 1)]
  np.testing.assert_array_equal(labels, np.stack(cover, -1).astype(np.float32))
  both, any_ = (cover[0] & cover[1]).sum(), (cover[0] | cover[1]).sum()
  assert mixtures.overlap_ratio(labels) == pytest.approx(both / any_)
  # SNR: the noise left after removing the clean tracks has the drawn power ratio
  clean = mixtures.simulate(pools, ["a", "b"], np.random.default_rng(0), rate=rate, beta=1.0,
                            utterances_per_speaker=(3, 3), snrs=(200,), noises=("white",))
  scale = np.dot(mix.audio, clean.audio) / np.dot(clean.audio, clean.audio)
  residual = mix.audio - scale * clean.audio
  speech_on = np.repeat(labels.max(-1) > 0, 80)[:len(mix.audio)]
  snr = 10 * np.log10(np.mean((scale * clean.audio[:len(speech_on)][speech_on]) ** 2)
                      / np.mean(residual ** 2))
  assert snr == pytest.approx(10, abs=1.0)


def test_resample_keeps_a_tone_and_the_duration():
  t = np.arange(22050) / 22050
  x = np.sin(2 * np.pi * 440 * t)
  y = speech.resample(x, 22050, 16000)
  assert len(y) == 16000
  spectrum = np.abs(np.fft.rfft(y))
  assert np.argmax(spectrum) == 440
  np.testing.assert_allclose(y[1000:15000], np.sin(2 * np.pi * 440 * np.arange(16000) / 16000
                                                   )[1000:15000], atol=1e-3)


def test_crops_cut_features_and_labels_at_the_same_place():
  feats = np.arange(230 * 3, dtype=np.float32).reshape(230, 3)
  rec = data.Recording("r", feats, [(0, 0.3, 1.1), (1, 0.9, 2.0)], ("a", "b"), 10.0, None,
                       16000, 230 * 160)
  crops = data.Crops([rec], 8, 20, 3, 2, 0.01, 0, windows_prev=1, start_share=0.3)
  batch = crops(5)
  labels = rec.labels(115, 0.02)
  for b in range(8):
    x, y, m = batch["features"][b].reshape(60, 3), batch["labels"][b].reshape(30, 2), \
        batch["frame_mask"][b].reshape(30)
    first = np.flatnonzero(m)[0]
    start = int(x[2 * first, 0] // 3)  # the feature frame the first valid step starts at
    assert start % 2 == 0
    valid = m > 0
    np.testing.assert_array_equal(y[valid], labels[start // 2:start // 2 + valid.sum()])
    assert batch["window_mask"][b].tolist() == [m[i * 10:(i + 1) * 10].any() for i in range(3)]


def test_baseline_parameters_within_10_percent_of_the_axial_model():
  counts = {}
  for variant in ("tts", "tts,sa_eend"):
    config = configs.get_config(variant)
    example = trainer.crops(config, [trainer.example_recording(config)])(0)
    module = trainer.module_of(config)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), example["features"],
                                                example["window_mask"],
                                                config.grid.windows_prev))
    counts[variant] = sum(x.size for x in jax.tree.leaves(shapes))
  ratio = counts["tts,sa_eend"] / counts["tts"]
  assert 0.9 <= ratio <= 1.1, counts


@pytest.mark.parametrize("engine,voice", [("espeak-ng", "en-us+f2"), ("flite", "kal16"),
                                          ("festival", "kal"), ("piper", "joe")])
def test_each_engine_speaks_at_the_rate_asked_and_rate_changes_duration(engine, voice):
  speech.require_engines([engine])
  text = "seven green houses stand by the quiet river"
  rng = np.random.default_rng(0)
  normal = speech.synthesize(speech.Speaker(engine, voice), text, 16000, rng)
  # Piper draws its phoneme durations at random: a 1.5x rate keeps the margin wide
  fast = speech.synthesize(speech.Speaker(engine, voice, rate=1.5), text, 16000, rng)
  assert normal.dtype == np.float32 and 1.0 < len(normal) / 16000 < 6.0
  assert len(fast) < 0.87 * len(normal)
  # speech: most energy below 4 kHz, and trimmed (loud within 20 ms of each end)
  spectrum = np.abs(np.fft.rfft(normal)) ** 2
  assert spectrum[:len(spectrum) // 2].sum() > 0.9 * spectrum.sum()
  edge = lambda x: np.abs(x).max() * 10 ** (-40 / 20)
  assert np.abs(normal[:320]).max() > edge(normal) and np.abs(normal[-320:]).max() > edge(normal)


def test_random_context_masks_whole_windows_around_the_current_one():
  feats = np.ones((2000, 3), np.float32)
  rec = data.Recording("r", feats, [(0, 0.0, 20.0)], ("a", "b"), 10.0, None, 16000, 2000 * 160)
  crops = data.Crops([rec], 64, 10, 6, 2, 0.01, 0, windows_prev=3, start_share=0.0,
                     random_context=True)
  batch = crops(0)
  mask = batch["window_mask"]
  assert mask[:, 3].all()  # the current window is always kept
  seen = set()
  for row, x, fm in zip(mask, batch["features"], batch["frame_mask"]):
    kept = np.flatnonzero(row) - 3
    assert list(kept) == list(range(kept[0], kept[-1] + 1))  # one contiguous context
    assert -3 <= kept[0] <= -1 and 0 <= kept[-1] <= 2
    seen.add((kept[0], kept[-1]))
    np.testing.assert_array_equal(x[~row], 0)
    np.testing.assert_array_equal(fm[~row], 0)
    assert (fm[row][:, 0] == 1).all()  # (a lookahead window may run past the end)
  assert len(seen) == 9  # every (before, after) pair drawn


def test_room_impulse_response_decays_60_db_and_reverberates_a_mixture():
  rng = np.random.default_rng(0)
  h = mixtures.room_impulse_response(rng, 16000)
  direct = int(np.argmax(np.abs(h)))
  assert h[direct] == 1.0 and direct < 0.005 * 16000
  tail = h[direct + 1:]
  tenth = len(tail) // 10
  # exponential decay to -60 dB over the RT60: the last tenth is far quieter than the first
  assert np.mean(tail[-tenth:] ** 2) < 1e-3 * np.mean(tail[:tenth] ** 2)
  tone = (0.5 * np.sin(2 * np.pi * 200 * np.arange(4000) / 16000)).astype(np.float32)
  dry = mixtures.simulate([[tone], [tone]], ["a", "b"], np.random.default_rng(1), rate=16000,
                          utterances_per_speaker=(2, 2), snrs=(200,))
  wet = mixtures.simulate([[tone], [tone]], ["a", "b"], np.random.default_rng(1), rate=16000,
                          utterances_per_speaker=(2, 2), snrs=(200,), rir=True)
  assert wet.segments == dry.segments and not np.allclose(wet.audio, dry.audio, atol=1e-3)


@pytest.mark.parametrize("subtype,channels,rate", [("PCM_16", 1, 8000), ("PCM_24", 2, 44100),
                                                   ("PCM_32", 2, 16000), ("FLOAT", 1, 22050)])
def test_read_audio_takes_any_pcm_or_float_wav_at_any_rate(subtype, channels, rate, tmp_path):
  import soundfile
  t = np.arange(int(rate * 0.5)) / rate
  tone = 0.5 * np.sin(2 * np.pi * 300 * t)
  wav = str(tmp_path / "a.wav")
  soundfile.write(wav, np.stack([tone] * channels, 1) if channels > 1 else tone, rate,
                  subtype=subtype)
  x = speech.read_audio(wav, 16000)
  assert x.dtype == np.float32 and len(x) == 8000
  want = 0.5 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)
  np.testing.assert_allclose(x[500:7500], want[500:7500], atol=2e-3)
