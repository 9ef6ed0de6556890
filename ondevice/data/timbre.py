"""Speaker timbre in numpy/scipy: f0 shift and vocal-tract-length warp.

Engines speak with adult voices only. A speaker's timbre is changed after
synthesis in two steps, so that children (short vocal tracts, high f0) and
elders (lower, slower voices) exist in every engine's family:

1. `shift_f0`: resampling plays the clip `f0_factor` times faster, which
   multiplies f0 and every formant by `f0_factor` and divides the duration
   by it. Callers ask the engine for a stretch `f0_factor` times longer, so
   the speaking rate is unchanged.
2. `warp_envelope`: the spectral envelope (the cepstrally smoothed log
   magnitude of each STFT frame, i.e. the vocal-tract filter) is moved along
   the frequency axis by `vtl_factor / f0_factor` while the harmonics (the
   fine structure) stay where they are, so that the formants end up scaled by
   `vtl_factor` and f0 by `f0_factor`. A vocal tract of length L has formants
   at odd multiples of c / 4L, so `vtl_factor` = L_adult / L_speaker (e.g.
   1.3 for a child's tract about 0.77 times as long).

This is the frequency-warping view of vocal-tract-length normalisation
(Lee and Rose, "A frequency warping approach to speaker normalization",
IEEE TSAP 1998) used the other way round, to create speakers.
"""
from __future__ import annotations

import fractions

import numpy as np
from scipy import signal

_FFT = 512
_HOP = 128
_LIFTER = 30           # cepstral coefficients kept: 1.9 ms at 16 kHz, below
                       # the pitch period of any voice up to 500 Hz
_FLOOR = 1e-9


def shift_f0(x: np.ndarray, factor: float) -> np.ndarray:
  """Plays `x` `factor` times faster (f0 and formants times `factor`)."""
  if factor <= 0:
    raise ValueError(f'f0 factor must be positive; got {factor}.')
  ratio = fractions.Fraction(float(factor)).limit_denominator(200)
  if ratio == 1:
    return np.asarray(x, np.float64)
  return signal.resample_poly(np.asarray(x, np.float64), ratio.denominator,
                              ratio.numerator)


def spectral_envelope(log_magnitude: np.ndarray) -> np.ndarray:
  """Cepstrally smoothed log magnitude, [bins, frames] -> [bins, frames]."""
  cepstrum = np.fft.irfft(log_magnitude, axis=0)
  cepstrum[_LIFTER:len(cepstrum) - _LIFTER + 1] = 0.0
  return np.fft.rfft(cepstrum, axis=0).real


def warp_envelope(x: np.ndarray, factor: float) -> np.ndarray:
  """Moves the spectral envelope of `x` to `factor` times its frequencies.

  The envelope at bin k becomes the old envelope at bin k / factor (held at
  the Nyquist value beyond it); each frame's spectrum is multiplied by the
  ratio of new to old envelope, which keeps the harmonics and the phase.
  """
  if factor <= 0:
    raise ValueError(f'envelope warp factor must be positive; got {factor}.')
  x = np.asarray(x, np.float64)
  if factor == 1.0 or len(x) == 0:
    return x
  _, _, spec = signal.stft(x, nperseg=_FFT, noverlap=_FFT - _HOP)
  envelope = spectral_envelope(np.log(np.abs(spec) + _FLOOR))
  bins = np.arange(spec.shape[0], dtype=np.float64)
  source = np.minimum(bins / factor, bins[-1])
  low = np.floor(source).astype(int)
  high = np.minimum(low + 1, bins.size - 1)
  frac = (source - low)[:, None]
  warped = (1.0 - frac) * envelope[low] + frac * envelope[high]
  _, y = signal.istft(spec * np.exp(warped - envelope), nperseg=_FFT,
                      noverlap=_FFT - _HOP)
  return y[:len(x)] if len(y) >= len(x) else np.pad(y, (0, len(x) - len(y)))


def apply_timbre(x: np.ndarray, f0_factor: float,
                 vtl_factor: float) -> np.ndarray:
  """f0 times `f0_factor`, formants times `vtl_factor`; float64 out.

  The duration shrinks by `f0_factor` (see the module docstring).
  """
  y = shift_f0(x, f0_factor)
  return warp_envelope(y, vtl_factor / f0_factor)
