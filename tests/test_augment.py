"""ondevice/augment.py: SpecAugment views and the `augment` config check."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from ondevice import augment


def _ones(batch=16, frames=10, bands=8, *extra):
  return np.ones((batch, frames, bands) + extra, np.float32)


def test_all_zero_settings_leave_the_clips_unchanged():
  x = np.random.default_rng(0).normal(size=(4, 10, 8)).astype(np.float32)
  out = augment.augment(x, jax.random.key(0), time_mask=0, freq_mask=0,
                        max_shift=0)
  np.testing.assert_array_equal(out, x)


def test_shift_is_a_circular_roll_within_the_bound():
  x = np.random.default_rng(1).normal(size=(32, 10, 8)).astype(np.float32)
  out = np.asarray(augment.augment(x, jax.random.key(3), time_mask=0,
                                   freq_mask=0, max_shift=2))
  shifts = []
  for xi, oi in zip(x, out):
    found = [s for s in range(-2, 3) if np.array_equal(np.roll(xi, s, 0), oi)]
    assert len(found) == 1
    shifts.append(found[0])
  # 32 clips draw from 5 shifts: more than one of them occurs.
  assert len(set(shifts)) > 1


@pytest.mark.parametrize('extra', [(), (3,)])
def test_masks_zero_one_band_of_frames_and_one_of_bands(extra):
  out = np.asarray(augment.augment(_ones(64, 10, 8, *extra),
                                   jax.random.key(5), time_mask=3,
                                   freq_mask=2, max_shift=0))
  widths = []
  for clip in out:
    zero = clip == 0
    if extra:  # Channels are masked alike.
      assert (zero == zero[..., :1]).all()
      zero = zero[..., 0]
    rows = np.flatnonzero(zero.all(axis=1))
    cols = np.flatnonzero(zero.all(axis=0))
    assert len(rows) <= 3 and len(cols) <= 2
    # Each mask is one contiguous band...
    assert len(rows) == 0 or rows[-1] - rows[0] == len(rows) - 1
    assert len(cols) == 0 or cols[-1] - cols[0] == len(cols) - 1
    # ...and nothing outside the two bands is touched.
    expected = np.zeros((10, 8), bool)
    expected[rows] = True
    expected[:, cols] = True
    np.testing.assert_array_equal(zero, expected)
    widths.append((len(rows), len(cols)))
  assert {w[0] for w in widths} == {0, 1, 2, 3}
  assert {w[1] for w in widths} == {0, 1, 2}


def test_same_key_same_view_other_key_other_view():
  x = np.random.default_rng(2).normal(size=(8, 10, 8)).astype(np.float32)
  a = augment.augment(x, jax.random.key(7))
  np.testing.assert_array_equal(a, augment.augment(x, jax.random.key(7)))
  assert not np.array_equal(a, augment.augment(x, jax.random.key(8)))


def test_features_without_time_and_frequency_axes_are_refused():
  with pytest.raises(ValueError, match=r'\[batch, time, freq'):
    augment.augment(np.ones((4, 10), np.float32), jax.random.key(0))


@pytest.mark.parametrize('settings, shape, match', [
    ({'time_mask': 2, 'freq_mak': 1}, None, r"unknown fields \['freq_mak'\]"),
    ({'time_mask': -1}, None, r'config.augment.time_mask must be a '
     r'non-negative integer; got -1'),
    ({'max_shift': 1.5}, None, 'config.augment.max_shift'),
    ({'time_mask': 10}, (10, 8), r'time_mask=10 must be below the 10 frames'),
    ({'freq_mask': 8}, (10, 8), r'freq_mask=8 must be below the 8 bands'),
    ({'max_shift': 12}, (10, 8), r'max_shift=12 must be below the 10 frames'),
    ({'time_mask': 2}, (784,), r'features have shape \(784,\)'),
])
def test_validate_names_the_field(settings, shape, match):
  with pytest.raises(ValueError, match=match):
    augment.validate(settings, feature_shape=shape)


def test_validate_accepts_zeros_on_any_features_and_fitting_masks():
  augment.validate({'time_mask': 0, 'freq_mask': 0, 'max_shift': 0},
                   feature_shape=(784,))
  augment.validate({'time_mask': 9, 'freq_mask': 7, 'max_shift': 9},
                   feature_shape=(10, 8))
  assert not augment.is_enabled({'time_mask': 0, 'freq_mask': 0})
  assert not augment.is_enabled(None)
  assert augment.is_enabled({'max_shift': 1})
