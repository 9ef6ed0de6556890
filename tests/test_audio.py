"""Tests of ondevice.audio against an independent float64 NumPy front end."""
import math

import jax
import numpy as np
import pytest
from scipy import signal

from ondevice import audio

SR = 16000


def _reference_filterbank(num_bins=40, fft_size=512, sr=SR, lo=20.0,
                          hi=8000.0):
  """Triangles linear in HTK mel, written as an explicit loop."""
  mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
  lo_mel, hi_mel = mel(lo), mel(hi)
  step = (hi_mel - lo_mel) / (num_bins + 1)
  fb = np.zeros((fft_size // 2 + 1, num_bins))
  for k in range(fft_size // 2 + 1):
    m = mel(k * sr / fft_size)
    for b in range(num_bins):
      left, centre, right = (lo_mel + b * step, lo_mel + (b + 1) * step,
                             lo_mel + (b + 2) * step)
      if left < m <= centre:
        fb[k, b] = (m - left) / (centre - left)
      elif centre < m < right:
        fb[k, b] = (right - m) / (right - centre)
  return fb


def _reference_log_mel(x):
  """float64 framing with a stride view, scipy's Hann, np.fft.rfft."""
  frames = np.lib.stride_tricks.sliding_window_view(x, 400, axis=-1)[..., ::160,
                                                                      :]
  window = signal.get_window('hann', 400)  # Periodic, as for spectra.
  power = np.abs(np.fft.rfft(frames * window, n=512, axis=-1)) ** 2
  return np.log(power @ _reference_filterbank() + 1e-6)


def _noise(shape, seed=0):
  return 0.1 * np.random.default_rng(seed).standard_normal(shape)


def test_filterbank_matches_loop_reference():
  fb = audio.mel_filterbank()
  assert fb.shape == (257, 40) and fb.dtype == np.float32
  # Only float32 rounding of weights in [0, 1] separates the two.
  np.testing.assert_allclose(fb, _reference_filterbank(), rtol=0, atol=1e-6)
  assert not fb.flags.writeable


def test_filterbank_rejects_bad_band_edges():
  with pytest.raises(ValueError, match='upper_hz'):
    audio.mel_filterbank(upper_hz=9000.0)


def test_shape_of_one_second_clip():
  # Tests share the [2, SR] shape so that log_mel compiles once for them.
  out = audio.log_mel(np.zeros((2, SR), np.float32))
  assert out.shape == (2, 98, 40) and out.dtype == np.float32
  # Silence gives log(1e-6) everywhere.
  np.testing.assert_allclose(out, np.log(1e-6), rtol=1e-6)


def test_matches_float64_reference():
  x = _noise((2, SR))
  got = np.asarray(audio.log_mel(x.astype(np.float32)))
  want = _reference_log_mel(x)
  # float32 error of a 512-point FFT is ~eps * log2(512) = 1e-6 of the
  # frame's energy per bin and the 257-term mel sum adds at most
  # 257 * eps = 3e-5 relative. For white noise each band holds at least
  # ~1% of the mean band energy (chi-square tails), so the log error is
  # below 100 * 3.1e-5 = 3.1e-3; float32 casting of x adds eps.
  np.testing.assert_allclose(got, want, rtol=0, atol=3.1e-3)
  # Typical errors are far smaller than that worst case.
  assert np.median(np.abs(got - want)) < 1e-5


def test_jit_and_vmap_agree_with_batched_call():
  x = _noise((2, SR), seed=1).astype(np.float32)
  batched = audio.log_mel(x)
  jitted = jax.jit(audio.log_mel)(x)
  mapped = jax.vmap(audio.log_mel)(x)
  np.testing.assert_allclose(jitted, batched, rtol=0, atol=1e-5)
  np.testing.assert_allclose(mapped, batched, rtol=0, atol=1e-5)


def test_other_clip_lengths_give_matching_frame_counts():
  assert audio.log_mel(np.zeros(8000, np.float32)).shape == (
      1 + (8000 - 400) // 160, 40)
  with pytest.raises(ValueError, match='shorter than one frame'):
    audio.log_mel(np.zeros(100, np.float32))


def test_integer_audio_is_rejected():
  with pytest.raises(ValueError, match='32768'):
    audio.log_mel(np.zeros(SR, np.int16))


def test_pure_tone_peaks_in_band_nearest_its_frequency():
  t = np.arange(SR) / SR
  tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
  energy = np.asarray(audio.log_mel(np.stack([tone, tone]))).mean(axis=(0, 1))
  # Centres computed here from the HTK formula, independent of the module.
  edges = np.linspace(2595 * np.log10(1 + 20 / 700),
                      2595 * np.log10(1 + 8000 / 700), 42)
  centres = 700 * (10 ** (edges[1:-1] / 2595) - 1)
  assert np.argmax(energy) == np.argmin(np.abs(centres - 1000.0))
  np.testing.assert_allclose(audio.mel_band_centres_hz(), centres, rtol=1e-9)
