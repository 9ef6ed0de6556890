"""The users of the personalisation study, in groups defined before scoring.

Groups (see `ondevice.data.outliers` and the README's "Outlier users"):

* 'typical': the first `config.users.num_typical` new users of the kind
  pre-training saw (eSpeak: common accents; a multi-engine population: seen
  families and conditions), in index order.
* 'outlier': new users of the other kind (eSpeak: rare accents; a
  population: unseen, i.e. a family or condition held out of pre-training).
* 'worst' (when `config.users.worst_candidates` > 0): of that many new
  typical-kind users, the `worst_fraction` on whom the global model, without
  adaptation, detects the fewest keywords among their calibration clips.

Calibration clips are every word's first `calibration_utterances`
utterances. They only ever select the worst users: every user's enrollment
pool and evaluation clips come from the later utterances, so the selection's
noise cannot inflate the worst group's measured gain, and every group is
scored on the same utterance indices. A user can be in 'typical' and 'worst'.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from few_shot import detection
from few_shot import personalize
from ondevice import user_corpus
from ondevice.data import base
from ondevice.data import outliers

GROUPS = ('typical', 'outlier', 'worst')
_SCORE_BATCH = 512


class Users(NamedTuple):
  """Normalised clips of the study's users and the users of each group.

  Attributes:
    clips: every scored user's clips (calibration utterances removed), y
      over the corpus's words, client_id the speaker index.
    groups: group name -> sorted speaker indices.
    screening: the worst group's selection ({} without one): candidates
      and their calibration detection rates.
  """
  clips: base.ArrayDataset
  groups: dict[str, list[int]]
  screening: dict[str, Any]


def _population(config):
  return config.data.get('population', None)


def _load(config, indices: list[int], keyword_utterances: int,
          other_utterances: int, train_ds: base.ArrayDataset
          ) -> base.ArrayDataset:
  """Normalised clips of `indices`: keywords and the corpus's other words."""
  corpus = user_corpus.corpus_config(config.data)
  clips = user_corpus.load_word_clips(
      corpus, indices, config.keywords, keyword_utterances, other_utterances,
      config.data.get('cache_dir', None) or None, _population(config))
  return user_corpus.normalise_dataset(clips, train_ds)


def other_utterances(config) -> int:
  """Utterances of every non-keyword word (0 in the config: as keywords)."""
  cfg = config.users
  return cfg.get('other_utterances_per_word', 0) or cfg.utterances_per_word


def pick(config) -> dict[str, list[int]]:
  """{'typical', 'outlier', 'candidates'}: speaker indices, index order."""
  cfg = config.users
  corpus = user_corpus.corpus_config(config.data)
  candidates = cfg.get('worst_candidates', 0)
  num_typical = max(cfg.num_typical, candidates)
  typical = user_corpus.pick_users(corpus, cfg.first_index, num_typical, 0,
                                   spread_accents=False,
                                   population=_population(config))
  outlier = (user_corpus.pick_users(corpus, cfg.first_index, 0,
                                    cfg.num_outlier, spread_accents=False,
                                    population=_population(config))
             if cfg.num_outlier else [])
  return {'typical': typical[:cfg.num_typical], 'outlier': outlier,
          'candidates': typical[:candidates]}


def clip_detections(model, state, clips: base.ArrayDataset, keywords,
                    far: float) -> np.ndarray:
  """Per keyword clip of `clips`, whether `state` (unadapted) detects it:
  fires above its user's threshold at `far` (from that user's own
  non-keyword clips, as `detection.detection_at_far`) with the right word.
  Non-keyword rows are False."""
  scores = jax.jit(personalize.make_scores(model))
  probs = np.concatenate([
      np.asarray(scores(state.params, state.model_state,
                        clips.x[i:i + _SCORE_BATCH]))
      for i in range(0, len(clips), _SCORE_BATCH)])
  keywords = np.asarray(keywords, np.int32)
  predicted, score = map(np.asarray, detection.spotter_scores(probs,
                                                              keywords))
  is_keyword = np.isin(clips.y, keywords)
  detected = np.zeros(len(clips), bool)
  for user in np.unique(clips.client_id):
    rows = clips.client_id == user
    threshold = float(detection.threshold_at_far(
        score[rows & ~is_keyword], far))
    detected |= (rows & is_keyword & (score > threshold) &
                 (predicted == clips.y))
  return detected


def screen_worst(config, model, state, candidates: list[int],
                 train_ds: base.ArrayDataset) -> dict[str, Any]:
  """The worst group: candidates scored on their calibration clips only.

  Returns:
    {'worst': selected indices, 'candidates', 'calibration_detection_rate'
     per candidate, 'fraction'}.
  """
  cfg = config.users
  calib = cfg.calibration_utterances
  # Only utterances < calib are synthesised here: all calibration clips.
  clips = _load(config, candidates, calib, calib, train_ds)
  keywords = _keywords(config, clips)
  detected = clip_detections(model, state, clips, keywords, config.far)
  rows = np.isin(clips.y, keywords)
  is_calibration = clips.meta['utterance'][rows] < calib
  worst = outliers.select_worst_users(detected[rows], clips.client_id[rows],
                                      is_calibration, cfg.worst_fraction)
  rates = outliers.per_user_rate(detected[rows], clips.client_id[rows],
                                 is_calibration)
  logging.info('Worst users: %d of %d candidates, calibration detection '
               'rates %s.', len(worst), len(candidates),
               [round(rates[u], 3) for u in worst])
  return {'worst': worst, 'candidates': list(candidates),
          'calibration_detection_rate': {str(u): r for u, r in rates.items()},
          'fraction': cfg.worst_fraction}


def _keywords(config, clips: base.ArrayDataset) -> np.ndarray:
  return np.array([clips.class_names.index(w) for w in config.keywords],
                  np.int32)


def load_users(config: ml_collections.ConfigDict, model, state,
               train_ds: base.ArrayDataset) -> Users:
  """Every group's users and their scored clips (see the module docstring).

  Args:
    model, state: the global model and its state (`personalize.as_state`),
      which screens the worst group's candidates.
    train_ds: the normalised training split (feature statistics).
  """
  picked = pick(config)
  groups = {'typical': picked['typical'], 'outlier': picked['outlier']}
  screening = {}
  if picked['candidates']:
    screening = screen_worst(config, model, state, picked['candidates'],
                             train_ds)
    groups['worst'] = screening['worst']
  groups = {g: sorted(ids) for g, ids in groups.items() if ids}
  scored = sorted(set().union(*map(set, groups.values())))
  calib = config.users.get('calibration_utterances', 0)
  clips = _load(config, scored, config.users.utterances_per_word,
                other_utterances(config), train_ds)
  clips = clips.take(clips.meta['utterance'] >= calib)
  return Users(clips, groups, screening)


def group_masks(groups: Mapping[str, list[int]], speakers
                ) -> dict[str, np.ndarray]:
  """group -> bool mask over `speakers` (the enrollment table's order)."""
  speakers = np.asarray(speakers)
  return {g: np.isin(speakers, ids) for g, ids in groups.items()}
