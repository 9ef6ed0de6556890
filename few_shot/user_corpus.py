"""New users with enough utterances per word to enroll and to evaluate.

The shared speech corpus (`ondevice.data.speech_keywords`) speaks each word
3 times per speaker by default, which leaves no held-out utterance after a
5-shot enrollment. Personalisation is therefore evaluated on *new* speakers
of the same synthetic population: speakers with indices at or above
`first_index` of the same corpus seed (so none of them was seen by the
global model or the meta-learner), each saying every word
`utterances_per_word` times. Typical and outlier-accent users are chosen in
equal numbers by scanning indices upwards, since outlier accents are rare
by construction (`speech_keywords.OUTLIER_ACCENTS`).

Clips come from `speech_keywords.synthesize_speaker`, so a user's clip is
the one the shared corpus would contain for that (seed, speaker, word,
utterance); features are `speech_keywords.log_mel_int16`. The arrays are
cached once per configuration, like the shared corpus.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np

from ondevice.data import speech_keywords as sk
from ondevice.data.base import ArrayDataset

_CACHE_FORMAT = 1


def select_users(corpus_seed: int, first_index: int, num_typical: int,
                 num_outlier: int, max_scan: int = 5000) -> list[int]:
  """Speaker indices >= first_index: num_typical typical, num_outlier outliers.

  Raises:
    ValueError: too few outlier speakers within `max_scan` indices.
  """
  if num_typical < 0 or num_outlier < 0 or num_typical + num_outlier == 0:
    raise ValueError('config.users.num_typical and num_outlier must be >= 0 '
                     f'and not both 0; got {num_typical}, {num_outlier}.')
  typical, outlier = [], []
  for index in range(first_index, first_index + max_scan):
    speaker = sk.make_speaker(sk.speaker_seed(corpus_seed, index))
    group = outlier if speaker.is_outlier_accent else typical
    want = num_outlier if speaker.is_outlier_accent else num_typical
    if len(group) < want:
      group.append(index)
    if len(typical) == num_typical and len(outlier) == num_outlier:
      return sorted(typical + outlier)
  raise ValueError(f'Found only {len(outlier)} outlier and {len(typical)} '
                   f'typical speakers in {max_scan} indices from '
                   f'{first_index}; lower config.users.num_outlier.')


def _cache_path(config: sk.SpeechCorpusConfig, indices: list[int],
                cache_dir: str | None) -> str:
  params = {'format': _CACHE_FORMAT, 'indices': indices,
            'config': dataclasses.asdict(config)}
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
  return os.path.join(cache_dir or sk.default_cache_dir(),
                      f'few_shot_users_{digest.hexdigest()[:20]}.npz')


def _synthesize(config: sk.SpeechCorpusConfig, indices: list[int]
                ) -> dict[str, np.ndarray]:
  parts = []
  for done, index in enumerate(indices, start=1):
    clips = sk.synthesize_speaker(config, index)
    clips['x'] = sk.log_mel_int16(clips.pop('waveform'))
    clips['client_id'] = np.full(len(clips['y']), index, np.int32)
    parts.append(clips)
    logging.info('Few-shot users: synthesised %d/%d speakers.', done,
                 len(indices))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def load_users(indices: list[int], utterances_per_word: int,
               corpus_seed: int = 0, cache_dir: str | None = None
               ) -> ArrayDataset:
  """Log-mel clips of the speakers `indices` (unnormalised).

  Returns:
    ArrayDataset like `speech_keywords.load_speech_keywords`'s: x float32
    [N, 98, 40], y over `speech_keywords.WORDS`, client_id the speaker index,
    meta 'accent_group', 'is_outlier_accent' and 'utterance'.
  """
  if utterances_per_word < 2:
    raise ValueError('config.users.utterances_per_word must be >= 2 (one to '
                     f'enroll, one to evaluate); got {utterances_per_word}.')
  config = sk.SpeechCorpusConfig(num_speakers=max(indices) + 1,
                                 utterances_per_word=utterances_per_word,
                                 seed=corpus_seed)
  path = _cache_path(config, list(indices), cache_dir)
  if os.path.exists(path):
    with np.load(path) as npz:
      arrays = {k: npz[k] for k in npz.files}
  else:
    logging.info('Synthesising %d few-shot users into %s.', len(indices),
                 path)
    arrays = _synthesize(config, list(indices))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  speakers = {i: sk.make_speaker(sk.speaker_seed(corpus_seed, i))
              for i in indices}
  group = np.array([sk.ACCENT_NAMES.index(speakers[int(c)].accent_group)
                    for c in arrays['client_id']], np.int32)
  return ArrayDataset(
      x=arrays['x'].astype(np.float32), y=arrays['y'],
      client_id=arrays['client_id'], class_names=sk.WORDS,
      meta={'accent_group': group,
            'is_outlier_accent': np.array(
                [speakers[int(c)].is_outlier_accent
                 for c in arrays['client_id']]),
            'utterance': arrays['utterance']},
      info={'accent_groups': sk.ACCENT_NAMES,
            'speakers': [dict(dataclasses.asdict(speakers[i]), index=i)
                         for i in indices]})


def normalise_like(users: ArrayDataset, train: ArrayDataset) -> ArrayDataset:
  """Standardises `users` with the train split's feature statistics."""
  mean = np.asarray(train.info['feature_mean'], np.float64)
  std = np.asarray(train.info['feature_std'], np.float64)
  x = ((users.x - mean) / std).astype(np.float32)
  return dataclasses.replace(users, x=x)
