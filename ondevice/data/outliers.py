"""Outlier users of a speaker population, defined before any measurement.

Two kinds of outlier users are compared with typical users:

  (a) unseen: a new user whose speaker family (voice engine and voices), or
      whose timbre, room, microphone or noise condition, was held out of
      pre-training (`population.Population.held_out_families` and
      `held_out_conditions`; `PopulationSpeaker.unseen`).
  (b) worst: among new users of seen families and conditions, the
      `fraction` (0.2 by default, `Population.worst_fraction`) with the
      lowest detection rate of the global, unadapted model on their own
      calibration clips. They are then scored on evaluation clips that are
      disjoint from the calibration clips, so that the selection's noise
      (regression to the mean) does not inflate their measured gain.

`calibration_split` splits a user's clips by utterance index;
`select_worst_users` only ever reads the calibration clips it is given.
"""
from __future__ import annotations

import numpy as np


def calibration_split(utterance: np.ndarray, num_calibration: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(calibration, evaluation) masks: utterances < num_calibration calibrate.

  Raises:
    ValueError: no utterance is left on one side.
  """
  utterance = np.asarray(utterance)
  calibration = utterance < num_calibration
  if not calibration.any() or calibration.all():
    raise ValueError('calibration_split needs utterances on both sides of '
                     f'num_calibration={num_calibration}; utterances range '
                     f'over [{utterance.min()}, {utterance.max()}].')
  return calibration, ~calibration


def per_user_rate(detected: np.ndarray, user: np.ndarray,
                  mask: np.ndarray) -> dict[int, float]:
  """Mean of `detected` over each user's rows where `mask` holds."""
  detected, user, mask = map(np.asarray, (detected, user, mask))
  rates = {}
  for u in np.unique(user[mask]):
    rows = mask & (user == u)
    rates[int(u)] = float(np.mean(detected[rows]))
  return rates


def select_worst_users(detected: np.ndarray, user: np.ndarray,
                       is_calibration: np.ndarray,
                       fraction: float = 0.2) -> list[int]:
  """The `fraction` of users with the lowest calibration detection rate.

  Args:
    detected: per keyword clip, whether the global model detected it (at
      its operating threshold, e.g. 5% false accepts).
    user: per clip, its user.
    is_calibration: per clip, whether it is a calibration clip; only those
      rows are read, so evaluation clips can never decide the selection.
    fraction: share of users selected, rounded to the nearest count (at
      least one).

  Returns:
    Selected user ids, sorted; ties in rate go to the lower user id.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must lie in (0, 1); got {fraction}.')
  is_calibration = np.asarray(is_calibration, bool)
  # Only calibration rows enter: index them before anything else is read.
  rows = np.flatnonzero(is_calibration)
  rates = per_user_rate(np.asarray(detected)[rows], np.asarray(user)[rows],
                        np.ones(len(rows), bool))
  if not rates:
    raise ValueError('select_worst_users got no calibration clips.')
  order = sorted(rates, key=lambda u: (rates[u], u))
  count = max(1, int(round(fraction * len(order))))
  return sorted(order[:count])
