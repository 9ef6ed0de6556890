"""Band-limited resampling of engine output to 16 kHz, and WAV reading."""
from __future__ import annotations

import functools
import io
import math
import wave

import numpy as np
from scipy import signal

SAMPLE_RATE = 16000


@functools.lru_cache(maxsize=None)
def _ratio(rate: int) -> tuple[int, int]:
  gcd = math.gcd(rate, SAMPLE_RATE)
  return SAMPLE_RATE // gcd, rate // gcd


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
  """int16 samples at `rate` Hz -> int16 at 16 kHz (Kaiser low-pass)."""
  if rate == SAMPLE_RATE:
    return np.asarray(samples, np.int16)
  up, down = _ratio(rate)
  x = signal.resample_poly(np.asarray(samples, np.float64), up, down)
  return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
  """(int16 mono samples, sample rate) of a 16-bit RIFF WAV file's bytes."""
  with wave.open(io.BytesIO(data)) as w:
    if w.getsampwidth() != 2:
      raise ValueError(f'expected 16-bit WAV; got {8 * w.getsampwidth()}-bit')
    frames = np.frombuffer(w.readframes(w.getnframes()), '<i2')
    channels, rate = w.getnchannels(), w.getframerate()
  return frames.reshape(-1, channels)[:, 0].copy(), rate
