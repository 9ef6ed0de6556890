"""Tests of few_shot.episodes: keyword, speaker and enrollment tasks.

Features encode their row (x[i] = i), so a sampled task tells which dataset
rows it holds.
"""
import jax
import numpy as np
import pytest

from few_shot import enrollment
from few_shot import episodes


def _dataset(num_speakers=4, num_words=8, utterances=5):
  speaker, word, _ = np.meshgrid(np.arange(num_speakers), np.arange(num_words),
                                 np.arange(utterances), indexing='ij')
  y = word.reshape(-1).astype(np.int32)
  client_id = speaker.reshape(-1).astype(np.int32)
  x = np.arange(len(y), dtype=np.float32)[:, None]
  return x, y, client_id


def _rows(batch):
  return np.asarray(batch['x'])[..., 0].astype(int)


def test_keyword_tasks_use_disjoint_class_sets_and_k_per_class():
  x, y, _ = _dataset()
  train = episodes.keyword_table(x, y, classes=[0, 1, 2, 3, 4], min_count=6)
  test = episodes.keyword_table(x, y, classes=[5, 6, 7], min_count=6)
  for table, allowed in ((train, {0, 1, 2, 3, 4}), (test, {5, 6, 7})):
    task = jax.tree.map(np.asarray, episodes.sample_keyword_task(
        table, jax.random.key(3), n_way=3, k_shot=2, n_query=4))
    classes = np.asarray(task['classes'])
    assert set(classes) <= allowed and len(set(classes)) == 3
    support, query = _rows(task['support']), _rows(task['query'])
    # Labels are 0..n_way-1 and each names the class drawn at that position.
    np.testing.assert_array_equal(np.bincount(task['support']['y']), [2] * 3)
    np.testing.assert_array_equal(np.bincount(task['query']['y']), [4] * 3)
    np.testing.assert_array_equal(y[support], classes[task['support']['y']])
    np.testing.assert_array_equal(y[query], classes[task['query']['y']])
    assert not set(support) & set(query)
    assert len(set(query)) == len(query)


def test_keyword_tasks_are_deterministic_by_key_and_vmappable():
  x, y, _ = _dataset()
  # The shapes of the test above, so the single-task sampler is compiled once.
  table = episodes.keyword_table(x, y, classes=[0, 1, 2, 3, 4], min_count=6)
  kwargs = dict(n_way=3, k_shot=2, n_query=4)
  batch = jax.tree.map(np.asarray, episodes.sample_keyword_tasks(
      table, jax.random.key(0), num_tasks=3, **kwargs))
  again = episodes.sample_keyword_tasks(table, jax.random.key(0),
                                        num_tasks=3, **kwargs)
  other = episodes.sample_keyword_tasks(table, jax.random.key(1),
                                        num_tasks=3, **kwargs)
  np.testing.assert_array_equal(_rows(batch['query']), _rows(again['query']))
  assert (_rows(batch['query']) != _rows(other['query'])).any()
  assert batch['support']['x'].shape == (3, 6, 1)
  keys = jax.random.split(jax.random.key(0), 3)
  for i in range(3):
    single = episodes.sample_keyword_task(table, keys[i], **kwargs)
    np.testing.assert_array_equal(_rows(single['support']),
                                  _rows(batch['support'])[i])


def test_keyword_table_rejects_classes_without_enough_examples():
  x, y, _ = _dataset(utterances=1)
  with pytest.raises(ValueError, match='fewer than 9'):
    episodes.keyword_table(x, y, classes=[0, 1], min_count=9)


def test_speaker_task_support_and_query_come_from_one_speaker():
  x, y, client_id = _dataset()
  # Speaker 2 lacks two utterances of word 1: its query is padded.
  keep = ~((client_id == 2) & (y == 1) & (np.arange(len(y)) % 5 >= 3))
  x, y, client_id = x[keep], y[keep], client_id[keep]
  x = np.arange(len(y), dtype=np.float32)[:, None]
  table = episodes.speaker_table(x, y, client_id, classes=[1, 3, 6])
  task = jax.tree.map(np.asarray, episodes.speaker_task(
      table, 2, jax.random.key(5), k_shot=2))
  support, query = _rows(task['support']), _rows(task['query'])
  qmask = np.asarray(task['query']['mask']) > 0
  assert (client_id[support] == 2).all()
  assert (client_id[query[qmask]] == 2).all()
  np.testing.assert_array_equal(y[support], task['support']['y'])
  np.testing.assert_array_equal(np.bincount(task['support']['y'])[[1, 3, 6]],
                                [2, 2, 2])
  # 5 utterances - 2 enrolled = 3 queries, but word 1 has only 3 - 2 = 1.
  assert qmask.sum() == 3 + 3 + 1
  assert not set(support) & set(query[qmask])


def test_enrollment_supports_are_nested_and_evaluation_is_fixed():
  x, y, client_id = _dataset(utterances=6)
  table = enrollment.enrollment_table(x, y, client_id, keywords=[0, 2],
                                    pool_size=4)
  enroll_index = np.asarray(table.enroll_index)
  table_rows = np.asarray(table.x)[..., 0].astype(int)
  key = jax.random.key(7)
  small = jax.tree.map(np.asarray, enrollment.all_enrollment_tasks(
      table, key, k_shot=1))
  large = jax.tree.map(np.asarray, enrollment.all_enrollment_tasks(
      table, key, k_shot=4))
  for user in range(4):
    s1 = _rows(small['support'])[user].reshape(2, 1)
    s4 = _rows(large['support'])[user].reshape(2, 4)
    np.testing.assert_array_equal(s1[:, 0], s4[:, 0])
    evaluated = _rows(large['query'])[user][
        np.asarray(large['query']['mask'][user]) > 0]
    np.testing.assert_array_equal(evaluated, _rows(small['query'])[user][
        np.asarray(small['query']['mask'][user]) > 0])
    own = np.flatnonzero(client_id == user)
    # Every utterance of the user is enrolled or evaluated, never both.
    pool = table_rows[enroll_index[user]]
    assert sorted(np.concatenate([pool.reshape(-1), evaluated])) == list(own)
    assert (client_id[s4] == user).all()
    # Non-keywords (words other than 0 and 2) are evaluated too.
    assert set(y[evaluated]) == set(range(8))


def test_replay_buffer_takes_per_word_clips_of_every_non_keyword():
  x, y, _ = _dataset()  # 4 speakers x 8 words x 5 utterances: 20 per word.
  replay = enrollment.replay_buffer(x, y, keywords=[0, 2], per_word=3,
                                    seed=1)
  rows = np.asarray(replay.x)[:, 0].astype(int)
  # 6 non-keyword words x 3 clips, no repeats, labels those of their rows.
  assert len(rows) == 18 and len(set(rows)) == 18
  np.testing.assert_array_equal(np.asarray(replay.y), y[rows])
  counts = np.bincount(np.asarray(replay.y), minlength=8)
  np.testing.assert_array_equal(counts, [0, 3, 0, 3, 3, 3, 3, 3])
  again = enrollment.replay_buffer(x, y, keywords=[0, 2], per_word=3, seed=1)
  np.testing.assert_array_equal(np.asarray(again.x), np.asarray(replay.x))
  with pytest.raises(ValueError, match='fewer than replay per_word=21'):
    enrollment.replay_buffer(x, y, keywords=[0], per_word=21, seed=1)
  with pytest.raises(ValueError, match='per_word must be >= 1'):
    enrollment.replay_buffer(x, y, keywords=[0], per_word=0, seed=1)
  with pytest.raises(ValueError, match='no non-keyword'):
    enrollment.replay_buffer(x, y, keywords=range(8), per_word=1, seed=1)


def test_with_replay_appends_the_buffer_to_every_support_only():
  x, y, client_id = _dataset(utterances=6)
  table = enrollment.enrollment_table(x, y, client_id, keywords=[0, 2],
                                      pool_size=4)
  replay = enrollment.replay_buffer(x, y, keywords=[0, 2], per_word=1,
                                    seed=0)
  tasks = enrollment.all_enrollment_tasks(table, jax.random.key(3), k_shot=2)
  joined = jax.tree.map(np.asarray, enrollment.with_replay(tasks, replay))
  tasks = jax.tree.map(np.asarray, tasks)
  # 4 users; 2 keywords x 2 shots of their own, then the 6 replayed clips.
  assert joined['support']['x'].shape == (4, 10, 1)
  np.testing.assert_array_equal(joined['support']['x'][:, :4],
                                tasks['support']['x'])
  for user in range(4):
    np.testing.assert_array_equal(joined['support']['x'][user, 4:],
                                  np.asarray(replay.x))
    np.testing.assert_array_equal(joined['support']['y'][user, 4:],
                                  np.asarray(replay.y))
  np.testing.assert_array_equal(joined['support']['mask'], 1.0)
  for part in ('x', 'y', 'mask'):
    np.testing.assert_array_equal(joined['query'][part], tasks['query'][part])
  # No buffer: the tasks come back as they are.
  assert enrollment.with_replay(tasks, None) is tasks
  # One unbatched task works the same way.
  one = enrollment.with_replay(jax.tree.map(lambda a: a[0], tasks), replay)
  np.testing.assert_array_equal(np.asarray(one['support']['y']),
                                joined['support']['y'][0])
