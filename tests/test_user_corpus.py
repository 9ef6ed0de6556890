"""Tests of ondevice.user_corpus: picking, synthesis, cache and normalisation."""
from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
import numpy as np
import pytest

from ondevice import user_corpus as uc
from ondevice.data import espeak
from ondevice.data import speech_keywords as sk
from ondevice.data.base import ArrayDataset

_CORPUS = sk.SpeechCorpusConfig(num_speakers=200)
_CLIPS = uc.UserClips(utterances_per_word=2, other_utterances=1, num_noise=3)

needs_espeak = pytest.mark.skipif(not espeak.is_available(),
                                  reason='espeak-ng is not installed')


def _is_outlier(index: int) -> bool:
  return sk.make_speaker(sk.speaker_seed(_CORPUS.seed, index)
                         ).is_outlier_accent


def _accent(index: int) -> str:
  return sk.make_speaker(sk.speaker_seed(_CORPUS.seed, index)).accent_group


def test_pick_users_in_index_order_matches_a_plain_scan():
  typical, outlier = [], []
  index = 200
  while len(typical) < 3 or len(outlier) < 2:
    kind = outlier if _is_outlier(index) else typical
    if len(kind) < (2 if kind is outlier else 3):
      kind.append(index)
    index += 1
  picked = uc.pick_users(_CORPUS, 200, 3, 2, spread_accents=False)
  assert picked == sorted(typical + outlier)


def test_pick_users_spreads_accents_and_is_deterministic():
  picked = uc.pick_users(_CORPUS, 200, num_typical=2, num_outlier=4)
  assert picked == uc.pick_users(_CORPUS, 200, 2, 4)
  assert len(set(picked)) == 6 and min(picked) >= 200
  assert [_is_outlier(i) for i in picked] == [False] * 2 + [True] * 4
  # Five outlier accents exist, so four outliers have four distinct ones.
  assert len({_accent(i) for i in picked[2:]}) == 4
  assert len({_accent(i) for i in picked[:2]}) == 2
  # A different seed is a different population.
  other = sk.SpeechCorpusConfig(num_speakers=200, seed=1)
  assert uc.pick_users(other, 200, 2, 4) != picked


def test_pick_users_first_outlier_is_the_first_outlier_index():
  first = next(i for i in range(200, 5000) if _is_outlier(i))
  assert uc.pick_users(_CORPUS, 200, 0, 1) == [first]


@pytest.mark.parametrize('kwargs, match', [
    (dict(first_index=100, num_typical=1, num_outlier=1), 'first_index=100'),
    (dict(first_index=200, num_typical=0, num_outlier=0), 'not both 0'),
    (dict(first_index=200, num_typical=-1, num_outlier=2), 'got -1'),
    (dict(first_index=200, num_typical=0, num_outlier=5, max_scan=10),
     'outlier speakers in 10'),
])
def test_pick_users_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    uc.pick_users(_CORPUS, **kwargs)


def test_user_clips_rejects_too_few_utterances():
  with pytest.raises(ValueError, match='utterances_per_word must be >= 2'):
    uc.UserClips(utterances_per_word=1)
  with pytest.raises(ValueError, match='num_noise'):
    uc.UserClips(num_noise=-1)


def test_corpus_config_from_data_config():
  data = ml_collections.ConfigDict(dict(
      name='speech_keywords', num_speakers=50, utterances_per_word=3,
      corpus_seed=4, words=('yes', 'no')))
  corpus = uc.corpus_config(data)
  assert (corpus.num_speakers, corpus.seed, corpus.words) == (
      50, 4, ('yes', 'no'))
  data.name = 'fashion_mnist'
  with pytest.raises(ValueError, match='config.data.name'):
    uc.corpus_config(data)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('users'))


@pytest.fixture(scope='module')
def users(cache_dir):
  if not espeak.is_available():
    pytest.skip('espeak-ng is not installed')
  return uc.load_users(_CORPUS, [201, 200], _CLIPS, cache_dir)


def test_load_users_shapes_labels_and_columns(users):
  n_words = len(sk.WORDS)
  kw, other, noise = users.keywords, users.other_words, users.noise
  assert kw.x.shape == (2 * n_words * 2, 98, 40) and kw.x.dtype == np.float32
  assert list(kw.client_id[:n_words * 2]) == [201] * n_words * 2
  assert sorted(np.bincount(kw.y)) == [4] * n_words
  assert set(kw.meta['utterance']) == {0, 1}
  assert other.x.shape == (2 * len(uc.OTHER_WORDS), 98, 40)
  assert other.class_names == uc.OTHER_WORDS
  assert noise.x.shape == (6, 98, 40) and set(noise.y) == {0}
  assert users.indices == [201, 200]
  for index in (200, 201):
    rows = kw.client_id == index
    assert set(kw.meta['is_outlier_accent'][rows]) == {_is_outlier(index)}
    assert set(kw.meta['accent_group'][rows]) == {
        sk.ACCENT_NAMES.index(_accent(index))}
    assert users.speaker(index)['accent_group'] == _accent(index)


def test_of_user_keeps_only_that_user(users):
  one = users.of_user(200)
  assert len(one.keywords) == len(sk.WORDS) * 2
  assert len(one.other_words) == len(uc.OTHER_WORDS)
  assert len(one.noise) == 3
  assert set(one.keywords.client_id) == {200}
  np.testing.assert_array_equal(
      one.keywords.x, users.keywords.x[users.keywords.client_id == 200])
  with pytest.raises(KeyError, match='999'):
    users.of_user(999)


@needs_espeak
def test_more_utterances_keep_the_same_first_clips(users, tmp_path):
  """A clip depends on (seed, speaker, word, utterance) only."""
  more = uc.load_users(_CORPUS, [200], uc.UserClips(3, 0, 0), str(tmp_path))
  few = users.of_user(200).keywords
  keep = more.keywords.meta['utterance'] < 2
  np.testing.assert_array_equal(more.keywords.x[keep], few.x)
  np.testing.assert_array_equal(more.keywords.y[keep], few.y)
  assert len(more.other_words) == 0 and len(more.noise) == 0


def test_second_load_reads_the_cache(users, cache_dir, monkeypatch):
  def fail(*args):
    raise AssertionError(f'synthesised again: {args}')
  monkeypatch.setattr(uc, '_synthesize', fail)
  again = uc.load_users(_CORPUS, [201, 200], _CLIPS, cache_dir)
  np.testing.assert_array_equal(again.keywords.x, users.keywords.x)
  np.testing.assert_array_equal(again.noise.x, users.noise.x)


@needs_espeak
def test_corrupt_cache_is_logged_and_rebuilt(users, tmp_path, caplog):
  folder = str(tmp_path)
  path = uc.cache_path(_CORPUS, 200, _CLIPS, folder)
  reference = users.of_user(200)
  uc.load_users(_CORPUS, [200], _CLIPS, folder)
  with np.load(path) as npz:
    arrays = dict(npz)
  arrays['noise_x'] = arrays['noise_x'] + np.float16(1.0)  # Bit rot.
  np.savez(path, **arrays)
  with caplog.at_level(logging.WARNING):
    rebuilt = uc.load_users(_CORPUS, [200], _CLIPS, folder)
  assert any('corrupt' in r.getMessage() and path in r.getMessage()
             for r in caplog.records)
  np.testing.assert_array_equal(rebuilt.noise.x, reference.noise.x)
  with open(path, 'wb') as f:
    f.write(b'not an npz file')
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    rebuilt = uc.load_users(_CORPUS, [200], _CLIPS, folder)
  assert any('corrupt' in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(rebuilt.keywords.x, reference.keywords.x)
  assert os.path.basename(path).startswith('new_user_200_')


def test_cache_path_depends_on_every_generating_field():
  paths = {uc.cache_path(_CORPUS, 200, _CLIPS, '/c'),
           uc.cache_path(_CORPUS, 201, _CLIPS, '/c'),
           uc.cache_path(sk.SpeechCorpusConfig(seed=1), 200, _CLIPS, '/c'),
           uc.cache_path(_CORPUS, 200, uc.UserClips(2, 1, 4), '/c'),
           uc.cache_path(_CORPUS, 200, uc.UserClips(3, 1, 3), '/c')}
  assert len(paths) == 5
  # The pre-training corpus size does not change a new user's clips.
  assert uc.cache_path(sk.SpeechCorpusConfig(num_speakers=8), 200, _CLIPS,
                       '/c') == uc.cache_path(_CORPUS, 200, _CLIPS, '/c')


def _tiny_users() -> uc.NewUsers:
  def ds(x, classes):
    n = len(x)
    return ArrayDataset(x=np.asarray(x, np.float32), y=np.zeros(n, np.int32),
                        client_id=np.full(n, 7, np.int32),
                        class_names=classes)
  return uc.NewUsers(ds([[[1.0, 2.0]], [[3.0, 6.0]]], ('a',)),
                     ds([[[5.0, 10.0]]], ('b',)), ds(np.zeros((0, 1, 2)),
                                                     ('noise',)))


def test_normalise_like_uses_the_train_statistics():
  train = ArrayDataset(x=np.zeros((1, 1, 2), np.float32),
                       y=np.zeros(1, np.int32), client_id=np.zeros(1, np.int32),
                       class_names=('a',),
                       info={'feature_mean': np.array([1.0, 2.0]),
                             'feature_std': np.array([2.0, 4.0])})
  out = uc.normalise_like(_tiny_users(), train)
  # (x - mean) / std per band, by hand.
  np.testing.assert_allclose(out.keywords.x, [[[0.0, 0.0]], [[1.0, 1.0]]])
  np.testing.assert_allclose(out.other_words.x, [[[2.0, 2.0]]])
  assert out.noise.x.shape == (0, 1, 2) and out.keywords.x.dtype == np.float32
  with pytest.raises(ValueError, match='feature_mean'):
    uc.normalise_like(_tiny_users(), dataclasses.replace(train, info={}))
