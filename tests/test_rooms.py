"""Tests of rooms (impulse responses), microphones, noise and timbre."""
import numpy as np
import pyroomacoustics as pra
import pytest

from ondevice.data import rooms
from ondevice.data import timbre

FS = 16000


def test_decay_time_of_an_exponential_decay():
  # Noise whose amplitude falls by 60 dB in 0.5 s: the Schroeder curve of
  # exp(-2 a t) energy is a straight line of slope -60 dB / 0.5 s.
  t = np.arange(FS) / FS
  rir = np.random.default_rng(0).standard_normal(FS) * np.exp(
      -3 * np.log(10) * t / 0.5)
  assert rooms.decay_time(rir, FS) == pytest.approx(0.5, rel=0.03)


def test_sabine_absorption_by_hand():
  # 5 x 4 x 3 m: V = 60 m^3, S = 2 (20 + 15 + 12) = 94 m^2. Sabine:
  # T = 0.1611 V / (S a), so a = 0.1611 * 60 / (94 * 0.5) = 0.2057.
  assert rooms.sabine_absorption(0.5, (5, 4, 3)) == pytest.approx(0.2057,
                                                                  abs=1e-3)


@pytest.mark.parametrize('size,rt60,source,mic', [
    ((3.0, 3.0, 2.5), 0.1, (1.0, 1.0, 1.5), (1.3, 1.2, 1.2)),
    ((6.0, 5.0, 3.0), 0.45, (1.0, 1.0, 1.5), (2.5, 2.0, 1.2)),
    ((12.0, 9.0, 4.0), 1.0, (1.0, 1.0, 1.5), (3.0, 3.5, 1.2)),
])
def test_impulse_response_has_the_requested_rt60(size, rt60, source, mic):
  rir = rooms.impulse_response(rooms.Room(size, rt60, source, mic))
  assert rir[0] == 1.0 and len(rir) == int(1.2 * rt60 * FS) + 1
  # pyroomacoustics' own estimate (the -5 and -35 dB crossings of the
  # Schroeder curve rather than a line fit) is an independent check; the two
  # estimators disagree by up to ~10% on short, direct-sound-dominated
  # responses, hence 15%.
  assert pra.experimental.measure_rt60(rir, FS, decay_db=30) == (
      pytest.approx(rt60, rel=0.15))
  # A distant microphone hears less direct sound than a close one.
  direct_share = 1.0 / np.sum(rir ** 2)
  assert 0 < direct_share < 1


def test_rooms_reject_bad_geometry():
  with pytest.raises(ValueError, match='outside the room'):
    rooms.check_room(rooms.Room((4, 4, 3), 0.4, (1, 1, 1), (5, 1, 1)), 'k')
  with pytest.raises(ValueError, match='RT60 must be > 0'):
    rooms.check_room(rooms.Room((4, 4, 3), 0.0, (1, 1, 1), (2, 2, 1)), 'k')
  with pytest.raises(ValueError, match='too short'):
    rooms.check_room(rooms.Room((20, 20, 5), 0.1, (1, 1, 1), (2, 2, 1)), 'k')


def _gain_db(mic, freq):
  t = np.arange(2 * FS) / FS
  out = rooms.apply_mic(np.sin(2 * np.pi * freq * t), mic)[FS:]
  return 10 * np.log10(np.mean(out ** 2) / 0.5)


def test_mic_band_attenuates_out_of_band_tones():
  mic = rooms.Mic(300.0, 3400.0, 0.0)
  # 4th-order Butterworth: |H|^2 = 1 / (1 + r^8). An octave below the
  # high-pass edge r = 2: 10 log10(1 + 256) = 24.1 dB down; two octaves
  # 48.2 dB. Above the low-pass edge the bilinear transform's frequency is
  # tan(pi f / fs): at 6 kHz r = tan(0.375 pi) / tan(0.2125 pi) = 3.06, so
  # 10 log10(1 + 3.06^8) = 38.9 dB down. At the edges, -3 dB.
  for freq, expected in [(150, -24.1), (75, -48.2), (6000, -38.9),
                         (300, -3.0), (3400, -3.0), (1000, 0.0)]:
    assert _gain_db(mic, freq) == pytest.approx(expected, abs=0.3), freq
    assert rooms.mic_gain_db(mic, freq) == pytest.approx(expected, abs=0.1)


def test_mic_tilt_is_its_db_per_octave():
  mic = rooms.Mic(20.0, 8000.0, 3.0)  # no low-pass, a 3 dB/octave tilt
  for freq, octaves in [(250, -2), (2000, 1), (4000, 2)]:
    assert _gain_db(mic, freq) == pytest.approx(3.0 * octaves, abs=0.2)


@pytest.mark.parametrize('kind', rooms.NOISE_KINDS)
def test_noise_has_unit_power(kind):
  noise = rooms.background_noise(np.random.default_rng(1), FS, kind)
  assert np.mean(noise ** 2) == pytest.approx(1.0, rel=1e-6)
  assert abs(noise.mean()) < 1e-9
  if kind == 'hum':  # Mains at 50 or 60 Hz dominates the spectrum.
    peak = np.argmax(np.abs(np.fft.rfft(noise)))  # 1 Hz bins
    assert peak in (50, 60)


def _harmonics(f0, envelope_hz, seconds=1.0):
  t = np.arange(int(seconds * FS)) / FS
  return sum(np.exp(-((k * f0 - envelope_hz) / 300.0) ** 2) *
             np.sin(2 * np.pi * k * f0 * t) for k in range(1, int(7900 / f0)))


def _spectrum(x):
  window = x[1000:-1000] * np.hanning(len(x) - 2000)
  return np.fft.rfftfreq(len(window), 1 / FS), np.abs(np.fft.rfft(window))


def _centroid(freqs, mag):
  """Power-weighted mean frequency: the formant of a one-formant spectrum."""
  return np.sum(freqs * mag ** 2) / np.sum(mag ** 2)


def test_shift_f0_plays_faster():
  t = np.arange(FS) / FS
  y = timbre.shift_f0(np.sin(2 * np.pi * 200 * t), 1.5)
  assert len(y) == pytest.approx(FS / 1.5, abs=2)
  freqs, mag = _spectrum(y)
  assert freqs[np.argmax(mag)] == pytest.approx(300.0, abs=2.0)


@pytest.mark.parametrize('factor', [1.3, 0.8])
def test_envelope_warp_moves_formants_not_harmonics(factor):
  # Harmonics of 100 Hz under a formant at 1 kHz: the formant moves to
  # factor * 1 kHz while every spectral peak stays a multiple of 100 Hz.
  freqs, mag = _spectrum(_harmonics(100.0, 1000.0))
  assert _centroid(freqs, mag) == pytest.approx(1000.0, rel=0.01)
  y = timbre.warp_envelope(_harmonics(100.0, 1000.0), factor)
  freqs, mag = _spectrum(y)
  assert _centroid(freqs, mag) == pytest.approx(1000.0 * factor, rel=0.05)
  for peak in freqs[np.argsort(mag)[-5:]]:
    assert abs(peak / 100.0 - round(peak / 100.0)) < 0.03


def test_apply_timbre_sets_f0_and_formants():
  # f0 x 1.25 (100 -> 125 Hz), formants x 1.4 (1000 -> 1400 Hz).
  y = timbre.apply_timbre(_harmonics(100.0, 1000.0), 1.25, 1.4)
  freqs, mag = _spectrum(y)
  assert _centroid(freqs, mag) == pytest.approx(1400.0, rel=0.06)
  peaks = np.sort(freqs[np.argsort(mag)[-4:]])
  assert np.all(np.abs(peaks / 125.0 - np.round(peaks / 125.0)) < 0.03)
