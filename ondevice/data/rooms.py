"""Recording conditions: a room's impulse response, a microphone, noise.

Room impulse responses come from the image-source method of pyroomacoustics
(Scheibler, Bezzam and Dokmanic, "Pyroomacoustics", ICASSP 2018) in a
shoebox room whose uniform wall absorption is set by Sabine's formula for the
requested RT60. Sabine's formula assumes a diffuse field, which small or
flat rooms do not have, so the decay of the generated response can miss the
target by tens of percent; `impulse_response` therefore measures the decay
(Schroeder backward integration, `decay_time`) and multiplies the response
after its direct sound by an exponential that moves the decay rate to the
target (the decay-rate augmentation of Bryan, "Impulse response data
augmentation and deep neural networks for blind room acoustic parameter
estimation", ICASSP 2020).

A device microphone is a 4th-order Butterworth band-pass (`low_hz`,
`high_hz`) followed by a spectral tilt of `tilt_db_per_octave` around 1 kHz.
Background noise is white, pink, brown, mains hum or speech-shaped babble.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import signal

SAMPLE_RATE = 16000
_SPEED_OF_SOUND = 343.0
_MIC_ORDER = 4
_TILT_PIVOT_HZ = 1000.0
_FIT_DB = (-5.0, -35.0)     # Schroeder fit range: T30
_LENGTH_RT60 = 1.2          # response length after the direct sound, in RT60
_BISECTIONS = 40
NOISE_KINDS = ('white', 'pink', 'brown', 'hum', 'babble')


@dataclasses.dataclass(frozen=True)
class Room:
  """A shoebox room with one source and one microphone (metres, seconds)."""
  size: tuple[float, float, float]
  rt60: float
  source: tuple[float, float, float]
  mic: tuple[float, float, float]

  @property
  def distance(self) -> float:
    return float(np.linalg.norm(np.subtract(self.source, self.mic)))


def check_room(room: Room, key: str) -> None:
  """Raises ValueError naming `key` for an impossible room."""
  if not room.rt60 > 0:
    raise ValueError(f'{key}: RT60 must be > 0 s; got {room.rt60}.')
  size = np.asarray(room.size, np.float64)
  if size.shape != (3,) or np.any(size <= 0):
    raise ValueError(f'{key}: room size must be 3 positive lengths; got '
                     f'{room.size}.')
  for name in ('mic', 'source'):
    point = np.asarray(getattr(room, name), np.float64)
    if point.shape != (3,) or np.any(point <= 0) or np.any(point >= size):
      raise ValueError(f'{key}: the {name} at {getattr(room, name)} lies '
                       f'outside the room of size {room.size}; put it '
                       'strictly inside.')
  if sabine_absorption(room.rt60, room.size) >= 1.0:
    raise ValueError(f'{key}: RT60 {room.rt60} s is too short for a room of '
                     f'size {room.size} (walls would absorb more than all '
                     'sound); use a longer RT60 or a smaller room.')


def sabine_absorption(rt60: float, size) -> float:
  """Wall absorption coefficient that gives `rt60` by Sabine's formula."""
  lx, ly, lz = size
  volume, surface = lx * ly * lz, 2 * (lx * ly + lx * lz + ly * lz)
  return 24 * np.log(10) * volume / (_SPEED_OF_SOUND * surface * rt60)


def decay_time(rir: np.ndarray, fs: int = SAMPLE_RATE) -> float:
  """RT60 from the Schroeder energy decay curve, extrapolated from T30.

  Fits a line to the backward-integrated energy in dB between -5 and -35 dB
  (ISO 3382-1) and returns the time it would take to fall by 60 dB.
  """
  energy = np.cumsum(np.asarray(rir, np.float64)[::-1] ** 2)[::-1]
  edc = 10 * np.log10(energy / energy[0] + 1e-300)
  fit = (edc <= _FIT_DB[0]) & (edc >= _FIT_DB[1])
  if fit.sum() < 2:
    raise ValueError('the impulse response does not decay by 35 dB.')
  t = np.flatnonzero(fit) / fs
  slope = np.polyfit(t, edc[fit], 1)[0]
  return float(-60.0 / slope)


def _image_source_rir(room: Room, fs: int) -> np.ndarray:
  import pyroomacoustics as pra  # pylint: disable=g-import-not-at-top
  absorption = sabine_absorption(room.rt60, room.size)
  max_order = int(np.ceil(_SPEED_OF_SOUND * room.rt60 / min(room.size)))
  shoebox = pra.ShoeBox(list(room.size), fs=fs,
                        materials=pra.Material(float(absorption)),
                        max_order=max_order, air_absorption=False)
  shoebox.add_source(list(room.source))
  shoebox.add_microphone(np.asarray(room.mic, np.float64)[:, None])
  shoebox.compute_rir()
  return np.asarray(shoebox.rir[0][0], np.float64)


def impulse_response(room: Room, fs: int = SAMPLE_RATE) -> np.ndarray:
  """The room's impulse response with its decay set to room.rt60.

  Starts at the direct sound, lasts 1.2 RT60 after it, and has a direct
  sound of amplitude 1.
  """
  check_room(room, 'room')
  rir = _image_source_rir(room, fs)
  start = int(np.argmax(np.abs(rir)))
  rir = rir[start:start + int(_LENGTH_RT60 * room.rt60 * fs) + 1]
  return _set_decay(rir, room.rt60, fs) / np.abs(rir[0])


def _set_decay(rir: np.ndarray, rt60: float, fs: int) -> np.ndarray:
  """rir * exp(-g t) with g found by bisection so that decay_time = rt60.

  decay_time falls as g grows; a fixed-point update can oscillate when the
  direct sound dominates the energy (a microphone close to the source).
  """
  t = np.arange(len(rir)) / fs
  nominal = 3 * np.log(10) / rt60  # amplitude decay rate of a 60 dB fall
  low, high = -nominal, 4 * nominal
  for _ in range(_BISECTIONS):
    mid = 0.5 * (low + high)
    try:
      measured = decay_time(rir * np.exp(-mid * t), fs)
    except ValueError:  # Fell by 35 dB at once: far too much damping.
      measured = 0.0
    low, high = (mid, high) if measured > rt60 else (low, mid)
  return rir * np.exp(-0.5 * (low + high) * t)


@dataclasses.dataclass(frozen=True)
class Mic:
  """A device microphone's response."""
  low_hz: float
  high_hz: float
  tilt_db_per_octave: float


def check_mic(mic: Mic, key: str) -> None:
  if not 0 < mic.low_hz < mic.high_hz <= SAMPLE_RATE / 2:
    raise ValueError(f'{key}: microphone band needs 0 < low_hz < high_hz <= '
                     f'{SAMPLE_RATE // 2}; got {mic.low_hz}, {mic.high_hz}.')


def mic_gain_db(mic: Mic, freqs: np.ndarray,
                fs: int = SAMPLE_RATE) -> np.ndarray:
  """`apply_mic`'s magnitude in dB at `freqs` (Hz), from its formulas.

  A Butterworth edge of order N at fc has power gain 1 / (1 + r ** 2N),
  with r = w / wc for the low-pass and wc / w for the high-pass, where
  w = tan(pi f / fs) is the frequency that the bilinear transform maps to f.
  """
  f = np.clip(np.asarray(freqs, np.float64), 1e-3, fs / 2 - 1e-3)
  warp = lambda hz: np.tan(np.pi * hz / fs)
  band = -10 * np.log10(1 + (warp(mic.low_hz) / warp(f)) ** (2 * _MIC_ORDER))
  if mic.high_hz < fs / 2:
    band -= 10 * np.log10(1 + (warp(f) / warp(mic.high_hz)) **
                          (2 * _MIC_ORDER))
  return band + _tilt_db(mic, f)


def _tilt_db(mic: Mic, f: np.ndarray) -> np.ndarray:
  return mic.tilt_db_per_octave * np.log2(np.maximum(f, 20.0) /
                                          _TILT_PIVOT_HZ)


def apply_mic(x: np.ndarray, mic: Mic, fs: int = SAMPLE_RATE) -> np.ndarray:
  """Filters `x` by the microphone: Butterworth band, then the tilt.

  The band edges are Butterworth filters (`mic_gain_db` gives their gain);
  the tilt is a zero-phase gain applied in the frequency domain over the
  zero-padded signal.
  """
  y = signal.sosfilt(signal.butter(_MIC_ORDER, mic.low_hz, 'highpass',
                                   fs=fs, output='sos'), x)
  if mic.high_hz < fs / 2:
    y = signal.sosfilt(signal.butter(_MIC_ORDER, mic.high_hz, 'lowpass',
                                     fs=fs, output='sos'), y)
  n = 2 * len(y)
  spectrum = np.fft.rfft(y, n)
  gain = 10 ** (_tilt_db(mic, np.fft.rfftfreq(n, 1 / fs)) / 20)
  return np.fft.irfft(spectrum * gain, n)[:len(y)]


def background_noise(rng: np.random.Generator, n: int, kind: str,
                     fs: int = SAMPLE_RATE) -> np.ndarray:
  """Unit-power noise of one of NOISE_KINDS."""
  from ondevice.data import speech_keywords as sk  # pylint: disable=g-import-not-at-top
  if kind in ('white', 'pink', 'brown'):
    return sk.coloured_noise(rng, n, NOISE_KINDS.index(kind))
  t = np.arange(n) / fs
  if kind == 'hum':  # Mains at 50 or 60 Hz with odd harmonics, and hiss.
    mains = rng.choice([50.0, 60.0])
    noise = sum(np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 2 * np.pi))
                / k for k in (1, 3, 5, 7))
    noise = noise / np.sqrt(np.mean(noise ** 2))
    noise = noise + 0.3 * sk.coloured_noise(rng, n, 1.0)
  elif kind == 'babble':  # Speech-shaped noise, modulated at syllable rate.
    band = signal.butter(2, (150.0, 4000.0), 'bandpass', fs=fs, output='sos')
    noise = signal.sosfilt(band, sk.coloured_noise(rng, n, 1.0))
    rate = rng.uniform(3.0, 6.0)
    noise *= 1.0 + 0.8 * np.sin(2 * np.pi * rate * t +
                                 rng.uniform(0, 2 * np.pi))
  else:
    raise ValueError(f'noise kind {kind!r} is unknown; choose one of '
                     f'{NOISE_KINDS}.')
  noise = noise - noise.mean()
  return noise / np.sqrt(np.mean(noise ** 2))
