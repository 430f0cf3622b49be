r"""Speaker diarization of noisy mixtures: the axial-attention diarizer, or the SA-EEND
baseline (`sdl.models.diarization`), on MFCC frames.

Run:

    python -m experiments.diarization --config=experiments/configs/diarization.py:smoke \
        --workdir=runs/diarization_smoke

Variants (`:arg`, joined with commas: `tts,sa_eend`):
  smoke     seconds, no text-to-speech needed: synthetic voices, 5-second mixtures, a tiny
            axial model, 6 steps. What the tests run, resume included.
  synthetic minutes: synthetic voices (held-out voices for validation), the full-size
            axial model.
  tts       the experiment: pseudo-speakers from espeak-ng, flite and festival
            (`python -m experiments.speech_data` writes their utterances first, about 15
            min), noisy 2-speaker mixtures at beta = 2 and SNR 5-20 dB, validated on base
            voices that training never saw. About an hour on one core; expect eval_der
            near 0.07 on the validation mixtures, and DER 11 % (collar 0.5) / 15 %
            (collar 0) on the 100 test mixtures (docs/benchmarks.md).
  sa_eend   the SA-EEND baseline instead of the axial model (2 layers, 256 units, 4 heads),
            sized within 10 % of the axial model's parameters (`tts,sa_eend`: DER 20 % /
            23 % on the same test mixtures).

What a grid is: the model predicts window n (`grid.window_frames` MFCC frames, 10 ms
each) from windows n - `windows_prev` .. n + `windows_ahead`, so a streaming latency is
one window plus the lookahead.
"""
import ml_collections

# The pseudo-speakers of the tts variant: engine -> base voices. Training and held-out
# base voices are disjoint; each base voice comes at 3 rates x 3 pitches.
TRAIN_VOICES = {
    "espeak-ng": ["en-us+m1", "en-us+m2", "en-us+m3", "en-us+m4", "en-us+m5", "en-us+f1",
                  "en-us+f2", "en-us+f3", "en+m7", "en+f5", "en+Alex", "en+Andrea",
                  "en+Denis", "en+Gene", "en+Henrique", "en+grandpa", "en+Storm",
                  "en+anikaRobot", "en-gb+m3", "en-gb+f2"],
    "flite": ["kal16", "awb", "rms"],
    "festival": ["kal"],
}
TEST_VOICES = {
    "espeak-ng": ["en-us+m6", "en-us+f4", "en+Annie", "en+Jacky", "en+Lee", "en-gb+m2"],
    "flite": ["slt"],
    "festival": ["slt_hts"],
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = (arg or "tts").split(",")
  c = ml_collections.ConfigDict()
  c.process = dict(configure=True)
  c.seed = 0
  c.data = dict(
      source="tts",                     # tts | synthetic
      path="data/diarization/tts",      # the mixture sets (train/, val/, test/)
      utterances="data/speech/utterances",  # the pseudo-speakers' utterance files
      utterances_per_voice=24,          # written per pseudo-speaker
      speakers=2,                       # per mixture (up to 4)
      beta=2.0,                         # mean silence before an utterance, seconds
      utterances_per_speaker=(10, 20),
      snrs=(5, 10, 15, 20),             # dB
      rir=False,                        # simulated room impulse responses
      rate=16000,
      train_mixtures=1000, val_mixtures=16, test_mixtures=100, variant_mixtures=50,
      synthetic_voices=(64, 16),        # synthetic source: training and held-out voices
  )
  c.features = dict(rate=16000, win_s=0.025, hop_s=0.01, n_filters=40, n_cepstra=20)
  # Training grids: 6 windows back, 2 ahead, each grid keeping a random part of that
  # context (`random_context`), so that inference can be swept over both
  # (`experiments.diarization_eval --sweep`). Inference uses `eval.windows_prev/ahead`.
  c.grid = dict(window_frames=100, windows_prev=6, windows_ahead=2, random_context=True)
  c.model = dict(name="axial", width=224, depth=2, heads=4, mlp_ratio=3, kernel=5,
                 strides=(2, 2), max_prev=6, max_ahead=2, dropout=0.1)
  c.optim = dict(name="adam", lr=1e-3, momentum=0.9, warmup_steps=200, decay="cosine",
                 weight_decay=0.0, clip_norm=5.0)
  c.mesh = dict(cpu_devices=0)
  # 3,500 steps of 16 grids: about an hour on one core of the 2-core CPU (both models
  # trained side by side), the budget
  c.train = dict(steps=3500, batch_size=16, log_every=50, eval_every=500,
                 checkpoint_every=250, keep_checkpoints=2, skip_nonfinite=False)
  c.eval = dict(median=5, threshold=0.5, batch=32, windows_prev=6, windows_ahead=1)
  c.log = dict(shown=("loss", "eval_der", "eval_der_collar0"), plot_train=("loss",),
               plot_eval=("eval_der", "eval_der_collar0"))
  for part in parts:
    if part == "smoke":
      c.data.update(source="synthetic", path="data/diarization/smoke", beta=0.5,
                    utterances_per_speaker=(2, 3), train_mixtures=8, val_mixtures=2,
                    test_mixtures=2, variant_mixtures=0, synthetic_voices=(6, 3))
      c.grid.update(window_frames=20, windows_prev=2, windows_ahead=1)
      c.eval.update(windows_prev=2, windows_ahead=1)
      c.model.update(width=16, depth=1, heads=2, mlp_ratio=2, max_prev=2, max_ahead=1,
                     dropout=0.0)
      c.optim.update(warmup_steps=2, lr=3e-3)
      c.train.update(steps=6, batch_size=4, log_every=2, eval_every=3, checkpoint_every=3)
      c.eval.update(batch=4, median=1)
    elif part == "synthetic":
      c.data.update(source="synthetic", path="data/diarization/synthetic",
                    train_mixtures=400, test_mixtures=40)
      c.train.update(steps=2000)
    elif part == "sa_eend":
      c.model = dict(name="sa_eend", width=256, depth=2, heads=4, hidden=1024, subsample=4,
                     dropout=0.1)
    elif part != "tts":
      raise ValueError(f"unknown diarization config variant {part!r}: choose smoke, "
                       "synthetic, tts or sa_eend (joined with commas)")
  return c
