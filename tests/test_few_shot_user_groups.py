"""User groups of the personalisation study (few_shot/user_groups.py), the
per-word clip counts of new users (ondevice/user_corpus.load_word_clips),
and the paired and constrained comparisons of few_shot/report.py."""
import numpy as np
import pytest

from few_shot import personalize
from few_shot import report
from few_shot import user_groups
from ondevice import user_corpus
from ondevice.data import speech_keywords as sk
from ondevice.data.base import ArrayDataset

CORPUS = sk.SpeechCorpusConfig(num_speakers=4, utterances_per_word=2,
                               words=('yes', 'no', 'up', 'cat'))


def test_word_clips_are_the_users_clips_with_per_word_counts(tmp_path):
  cache = str(tmp_path)
  clips = user_corpus.load_word_clips(CORPUS, [5, 4], ('no', 'yes'), 3, 1,
                                      cache_dir=cache, num_workers=1)
  full = user_corpus.load_users(CORPUS, [4, 5],
                                user_corpus.UserClips(utterances_per_word=3),
                                cache).keywords
  assert clips.class_names == CORPUS.words
  # Users in the order asked for; 2 keywords x 3 + 2 other words x 1 each.
  assert [int(c) for c in clips.client_id[::8]] == [5, 4]
  assert len(clips) == 16
  for user in (4, 5):
    for word in range(4):
      wanted = 3 if CORPUS.words[word] in ('yes', 'no') else 1
      mine = (clips.client_id == user) & (clips.y == word)
      theirs = ((full.client_id == user) & (full.y == word) &
                (full.meta['utterance'] < wanted))
      assert mine.sum() == wanted
      # The very same clips as a corpus of these users with more utterances.
      np.testing.assert_array_equal(clips.x[mine], full.x[theirs])
      np.testing.assert_array_equal(clips.meta['utterance'][mine],
                                    full.meta['utterance'][theirs])


def test_word_clips_from_worker_processes_equal_the_serial_ones(tmp_path):
  serial = user_corpus.load_word_clips(CORPUS, [4, 6], ('up',), 2, 1,
                                       cache_dir=str(tmp_path / 'a'),
                                       num_workers=1)
  pooled = user_corpus.load_word_clips(CORPUS, [4, 6], ('up',), 2, 1,
                                       cache_dir=str(tmp_path / 'b'),
                                       num_workers=2)
  np.testing.assert_array_equal(serial.x, pooled.x)
  np.testing.assert_array_equal(serial.y, pooled.y)
  np.testing.assert_array_equal(serial.client_id, pooled.client_id)


@pytest.mark.parametrize('keywords', [(), ('yes', 'stop')])
def test_word_clips_reject_keywords_outside_the_corpus(keywords, tmp_path):
  with pytest.raises(ValueError, match='must be words of the corpus'):
    user_corpus.load_word_clips(CORPUS, [4], keywords, 2, 1,
                                cache_dir=str(tmp_path), num_workers=1)


class _LogitsModel:
  """A "model" whose logits are its inputs (to hand-derive detections)."""

  def apply(self, variables, x, train=False):
    del variables, train
    return x


def test_clip_detections_use_each_users_own_threshold():
  # Classes 0, 1 are keywords, 2 is not. A clip's firing score is its top
  # softmax probability when the top class is a keyword, else -inf; each
  # user's threshold lets floor(far * negatives) of its negatives fire.
  big, mid = [6.0, 0.0, 0.0], [2.0, 0.0, 0.0]
  x = np.array([big, mid, [0.0, 4.0, 0.0], [0.0, 0.0, 5.0],  # user 7
                [3.0, 0.0, 0.0], mid, big, [0.0, 0.0, 3.0]],  # user 8
               np.float32)
  y = np.array([0, 0, 0, 2, 2, 2, 0, 2], np.int32)
  user = np.array([7, 7, 7, 7, 8, 8, 8, 8], np.int32)
  clips = ArrayDataset(x=x, y=y, client_id=user, class_names=('a', 'b', 'c'))
  state = personalize.as_state({}, {})
  detected = user_groups.clip_detections(_LogitsModel(), state, clips,
                                         [0, 1], far=0.5)
  # User 7: one negative (class 2 wins: -inf), none may fire, threshold
  # -inf: 'big' and 'mid' detect; row 2 fires as word 1, the wrong word.
  # User 8: negatives score 0.909 (logit 3), 0.787 (logit 2) and -inf; one
  # of three may fire, so the threshold is 0.787 and 'big' (0.995) detects.
  np.testing.assert_array_equal(
      detected, [True, True, False, False, False, False, True, False])


def test_groups_summary_means_and_standard_errors():
  per_user = {'detection_rate': np.array([0.2, 0.4, 0.9, 0.5]),
              'false_accept_rate': np.zeros(4),
              'keyword_accuracy': np.ones(4)}
  masks = user_groups.group_masks({'typical': [10, 11], 'worst': [11]},
                                  [10, 11, 12, 13])
  out = personalize.groups_summary(per_user, masks)
  assert out['typical']['detection_rate'] == pytest.approx(0.3)
  # std(ddof=1) of (0.2, 0.4) is 0.1414; / sqrt(2) = 0.1.
  assert out['typical']['detection_rate_sem'] == pytest.approx(0.1)
  assert out['worst'] == {**out['worst'], 'num_users': 1,
                          'detection_rate': 0.4, 'detection_rate_sem': 0.0}
  assert out['all']['detection_rate'] == pytest.approx(0.5)
  assert out['all']['num_users'] == 4


def test_paired_difference_is_the_mean_and_standard_error_of_differences():
  out = report.paired_difference([0.5, 0.7, 0.9], [0.4, 0.7, 0.6])
  # Differences 0.1, 0.0, 0.3: mean 0.1333, sd 0.1528, se 0.0882.
  assert out['diff'] == pytest.approx(0.4 / 3)
  assert out['se'] == pytest.approx(0.152753 / np.sqrt(3), rel=1e-5)
  assert out['n'] == 3


def _group(rate):
  return {'detection_rate': rate, 'detection_rate_sem': 0.01}


def test_best_gain_keeping_typical_skips_methods_that_hurt_typical_users():
  personal = {
      'global': {1: {'typical': _group(0.80), 'outlier': _group(0.40)}},
      # Doubles outliers but costs typical users 2 points: excluded.
      'a': {1: {'typical': _group(0.78), 'outlier': _group(0.80)}},
      # +50% for outliers, typical users lose half a point: kept.
      'b': {1: {'typical': _group(0.795), 'outlier': _group(0.60)}},
  }
  out = report.best_gain_keeping_typical(personal, [1], 'outlier')
  assert out['method'] == 'b'
  assert out['relative_gain'] == pytest.approx(0.5)
  assert out['typical_delta'] == pytest.approx(-0.005)
  assert report.best_gains(personal, [1])['best_outlier_gain']['method'] == 'a'


def test_meta_vs_finetune_pairs_users_and_names_the_best_init():
  per_user = {report.PLAIN_FINETUNE: {1: [0.5, 0.5, 0.5]},
              'reptile': {1: [0.6, 0.5, 0.7]},
              'anil': {1: [0.4, 0.5, 0.5]}}
  out = report.meta_vs_finetune(per_user, ('reptile', 'anil'), 1)
  assert out['best']['init'] == 'reptile'
  assert out['best']['diff'] == pytest.approx(0.1)
  assert out['anil']['diff'] == pytest.approx(-1 / 30)
  assert report.meta_vs_finetune(per_user, ('reptile',), 3) == {}


def test_pick_takes_candidates_typical_and_outliers_in_index_order():
  from configs import few_shot_kws  # pylint: disable=g-import-not-at-top
  config = few_shot_kws.get_config('outliers,smoke')
  picked = user_groups.pick(config)
  assert len(picked['candidates']) == config.users.worst_candidates
  assert picked['typical'] == picked['candidates'][:config.users.num_typical]
  assert len(picked['outlier']) == config.users.num_outlier
  assert not set(picked['outlier']) & set(picked['candidates'])
  assert min(picked['outlier'] + picked['candidates']) >= (
      config.users.first_index)
  assert picked['candidates'] == sorted(picked['candidates'])
