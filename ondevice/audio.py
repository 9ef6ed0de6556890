"""Log-mel features in JAX: the keyword-spotting front end.

The standard KWS front end (e.g. Warden, "Speech Commands: A Dataset for
Limited-Vocabulary Speech Recognition", arXiv:1804.03209; Zhang et al.,
"Hello Edge: Keyword Spotting on Microcontrollers", arXiv:1711.07128):
25 ms Hann windows every 10 ms, a 512-point power spectrum, 40 triangular
mel filters, and a log. Frames are taken without centre padding, so a 1 s
clip at 16 kHz gives 1 + (16000 - 400) // 160 = 98 frames.

The mel scale is HTK's, mel(f) = 2595 log10(1 + f / 700) (Young et al.,
The HTK Book), with bands spread evenly in mel between `lower_hz` (20 Hz)
and `upper_hz` (8 kHz, the Nyquist frequency at 16 kHz). Each filter is a
triangle that is linear in mel (as in `tf.signal.linear_to_mel_weight_matrix`),
peaking at 1 on its centre and reaching 0 on its neighbours' centres; filters
are not area-normalised.

`log_mel` is a pure jnp function of the waveform: it jits, vmaps and runs on
any leading batch shape.

    feats = jax.jit(log_mel)(waveforms)   # [B, 16000] -> [B, 98, 40]
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400     # 25 ms at 16 kHz
FRAME_STEP = 160       # 10 ms at 16 kHz
FFT_SIZE = 512
NUM_MEL_BINS = 40
LOWER_HZ = 20.0
UPPER_HZ = 8000.0
LOG_OFFSET = 1e-6


def hz_to_mel(hz):
  """HTK mel scale: 2595 log10(1 + f / 700)."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  """Inverse of `hz_to_mel`."""
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_band_centres_hz(*, num_mel_bins: int = NUM_MEL_BINS,
                        lower_hz: float = LOWER_HZ,
                        upper_hz: float = UPPER_HZ) -> np.ndarray:
  """Centre frequency (Hz) of each mel band, shape [num_mel_bins]."""
  edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz),
                      num_mel_bins + 2)
  return mel_to_hz(edges[1:-1])


@functools.lru_cache(maxsize=16)
def mel_filterbank(*, num_mel_bins: int = NUM_MEL_BINS,
                   fft_size: int = FFT_SIZE,
                   sample_rate: int = SAMPLE_RATE,
                   lower_hz: float = LOWER_HZ,
                   upper_hz: float = UPPER_HZ) -> np.ndarray:
  """Triangular HTK mel filters, built once per setting in NumPy.

  Args:
    num_mel_bins: number of bands.
    fft_size: FFT length; the filters act on its fft_size // 2 + 1 bins.
    sample_rate: sampling rate in Hz.
    lower_hz: lower edge of the first band.
    upper_hz: upper edge of the last band, at most sample_rate / 2.

  Returns:
    Read-only float32 matrix [fft_size // 2 + 1, num_mel_bins]; a power
    spectrum [..., bins] times it gives mel energies [..., num_mel_bins].
  """
  if num_mel_bins < 1:
    raise ValueError(f'num_mel_bins must be positive; got {num_mel_bins}.')
  if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2:
    raise ValueError(
        f'Need 0 <= lower_hz < upper_hz <= sample_rate / 2 = '
        f'{sample_rate / 2}; got lower_hz={lower_hz}, upper_hz={upper_hz}.')
  bin_mel = hz_to_mel(np.fft.rfftfreq(fft_size, d=1.0 / sample_rate))
  edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz),
                      num_mel_bins + 2)
  left, centre, right = edges[:-2], edges[1:-1], edges[2:]
  rising = (bin_mel[:, None] - left) / (centre - left)
  falling = (right - bin_mel[:, None]) / (right - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
  weights.setflags(write=False)  # Shared by every caller through the cache.
  return weights


def num_frames(num_samples: int, *, frame_length: int = FRAME_LENGTH,
               frame_step: int = FRAME_STEP) -> int:
  """Frames in a clip without centre padding: 1 + (n - length) // step."""
  if num_samples < frame_length:
    raise ValueError(f'A clip of {num_samples} samples is shorter than one '
                     f'frame ({frame_length} samples).')
  return 1 + (num_samples - frame_length) // frame_step


def hann_window(length: int) -> np.ndarray:
  """Periodic Hann window 0.5 - 0.5 cos(2 pi n / length), as for STFTs."""
  n = np.arange(length)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def power_spectrogram(waveform: jax.Array, *,
                      frame_length: int = FRAME_LENGTH,
                      frame_step: int = FRAME_STEP,
                      fft_size: int = FFT_SIZE) -> jax.Array:
  """|rfft(hann * frame)|^2 of each frame: [..., T] -> [..., F, fft//2+1]."""
  if fft_size < frame_length:
    raise ValueError(f'fft_size={fft_size} must be at least '
                     f'frame_length={frame_length}.')
  frames_count = num_frames(waveform.shape[-1], frame_length=frame_length,
                            frame_step=frame_step)
  index = (np.arange(frames_count)[:, None] * frame_step
           + np.arange(frame_length)[None, :])
  frames = waveform[..., index] * hann_window(frame_length)
  spectrum = jnp.fft.rfft(frames, n=fft_size, axis=-1)
  return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2


@functools.partial(jax.jit, static_argnames=(
    'sample_rate', 'frame_length', 'frame_step', 'fft_size', 'num_mel_bins',
    'lower_hz', 'upper_hz', 'log_offset'))
def log_mel(waveform: jax.Array, *, sample_rate: int = SAMPLE_RATE,
            frame_length: int = FRAME_LENGTH, frame_step: int = FRAME_STEP,
            fft_size: int = FFT_SIZE, num_mel_bins: int = NUM_MEL_BINS,
            lower_hz: float = LOWER_HZ, upper_hz: float = UPPER_HZ,
            log_offset: float = LOG_OFFSET) -> jax.Array:
  """Log mel energies log(mel + log_offset) of float audio.

  Args:
    waveform: float audio in [-1, 1] (int16 samples / 32768), shape
      [..., num_samples]; any leading batch shape.
    sample_rate: sampling rate in Hz (16000 for the default frame sizes).
    frame_length: window length in samples (400 = 25 ms).
    frame_step: hop in samples (160 = 10 ms).
    fft_size: FFT length (zero-padded frames).
    num_mel_bins: number of mel bands.
    lower_hz: lower edge of the first mel band.
    upper_hz: upper edge of the last mel band.
    log_offset: added before the log so that silence stays finite.

  Returns:
    float32 [..., num_frames, num_mel_bins]; [..., 98, 40] for 1 s at 16 kHz.
    The function is jitted (settings are static), so eager calls compile
    once per input shape.
  """
  if not jnp.issubdtype(waveform.dtype, jnp.floating):
    raise ValueError(f'log_mel expects float audio in [-1, 1]; got dtype '
                     f'{waveform.dtype}. Divide int16 samples by 32768.')
  power = power_spectrogram(waveform.astype(jnp.float32),
                            frame_length=frame_length, frame_step=frame_step,
                            fft_size=fft_size)
  weights = mel_filterbank(num_mel_bins=num_mel_bins, fft_size=fft_size,
                           sample_rate=sample_rate, lower_hz=lower_hz,
                           upper_hz=upper_hz)
  mel = jnp.matmul(power, weights, precision=jax.lax.Precision.HIGHEST)
  return jnp.log(mel + log_offset)
