"""Per-user enrollment tasks for personalisation and its meta-training.

A user enrolls by saying each keyword K times; the personalised model is
then judged on everything else the user says: held-out keyword utterances
(detections) and utterances of all other words (false accepts). The table
splits every user's utterances once, host-side, into an enrollment pool (the
first `pool_size` utterances of each keyword) and a fixed evaluation set, so
results for different K and different initialisations are paired on the
same utterances; K-shot supports are drawn from the pool on device with an
explicit key, and the same key gives nested supports as K grows.

Meta-training on these tasks (`sample_enrollment_tasks`) makes the outer
loss exactly the personalisation objective: adapt on K keyword utterances,
then classify all of the speaker's other utterances (Finn et al. 2017's
MAML with users as tasks, as in Per-FedAvg, Fallah et al. 2020).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from few_shot import episodes
from few_shot.episodes import Task


class EnrollmentTable(NamedTuple):
  """Each user's enrollment pool and fixed evaluation utterances.

  Attributes:
    x: features of the indexed rows only, [M, ...].
    y: int32 [M]: the word of each row.
    enroll_index: int32 [S, C, P]: rows of x in user s's enrollment pool for
      keyword c (P = the largest K to evaluate).
    eval_index: int32 [S, E]: user s's evaluation utterances (keywords not
      in the pool, and every non-keyword), padded.
    eval_mask: float32 [S, E]: 1 for a real evaluation utterance.
    keywords: int32 [C]: the keywords' labels.
    speakers: int32 [S]: the users' client ids.
  """
  x: jax.Array
  y: jax.Array
  enroll_index: jax.Array
  eval_index: jax.Array
  eval_mask: jax.Array
  keywords: jax.Array
  speakers: jax.Array


def enrollment_table(x: np.ndarray, y: np.ndarray, client_id: np.ndarray,
                     keywords: Sequence[int], pool_size: int,
                     speakers: Sequence[int] | None = None
                     ) -> EnrollmentTable:
  """Splits every user's utterances into an enrollment pool and eval set.

  The first `pool_size` utterances (in dataset order) of each keyword form
  the pool that K-shot supports are drawn from; all other utterances of the
  user are evaluated, whatever K is, so results for different K and
  different initialisations are paired on the same trials.

  Raises:
    ValueError: a user with pool_size or fewer utterances of a keyword.
  """
  keywords = [int(k) for k in keywords]
  speakers = (np.unique(client_id) if speakers is None
              else np.asarray(speakers))
  pools, evals, short = [], [], []
  for s in speakers:
    own = client_id == s
    pool = []
    for k in keywords:
      rows = np.flatnonzero(own & (y == k))
      if len(rows) <= pool_size:
        short.append((int(s), k, len(rows)))
      pool.append(rows[:pool_size])
    pools.append(pool)
    evals.append(np.setdiff1d(np.flatnonzero(own), np.concatenate(pool)))
  if short:
    raise ValueError(
        f'(speaker, keyword, utterances) {short[:5]} have at most pool_size='
        f'{pool_size} utterances, leaving none to evaluate; lower the largest '
        'K or synthesise more utterances per word.')
  used = np.concatenate([np.concatenate(p) for p in pools] + evals)
  remap = {int(r): i for i, r in enumerate(used)}
  enroll = np.array([[[remap[int(r)] for r in rows] for rows in pool]
                     for pool in pools], np.int32)
  width = max(len(e) for e in evals)
  eval_index = np.zeros((len(speakers), width), np.int32)
  eval_mask = np.zeros((len(speakers), width), np.float32)
  for i, rows in enumerate(evals):
    eval_index[i, :len(rows)] = [remap[int(r)] for r in rows]
    eval_mask[i, :len(rows)] = 1.0
  return EnrollmentTable(
      x=jnp.asarray(x[used]), y=jnp.asarray(y[used], jnp.int32),
      enroll_index=jnp.asarray(enroll), eval_index=jnp.asarray(eval_index),
      eval_mask=jnp.asarray(eval_mask),
      keywords=jnp.asarray(keywords, jnp.int32),
      speakers=jnp.asarray(speakers, jnp.int32))


@functools.partial(jax.jit, static_argnames=('k_shot',))
def enrollment_task(table: EnrollmentTable, user: jax.Array, key: jax.Array,
                    *, k_shot: int) -> Task:
  """User `user`'s K-shot enrollment (support) and evaluation (query) sets.

  The support holds k_shot utterances per keyword drawn from the pool by a
  permutation of `key`; the same key gives nested supports for growing K.
  """
  _, num_keywords, pool = table.enroll_index.shape
  if not 1 <= k_shot <= pool:
    raise ValueError(f'k_shot={k_shot} must lie in [1, {pool}] (the '
                     'enrollment pool size of the table).')
  order = jnp.argsort(jax.random.uniform(key, (num_keywords, pool)), axis=1)
  rows = jnp.take_along_axis(table.enroll_index[user], order, axis=1)
  rows = rows[:, :k_shot].reshape(-1)
  eval_rows = table.eval_index[user]
  return {'support': {'x': jnp.take(table.x, rows, axis=0),
                      'y': jnp.take(table.y, rows),
                      'mask': jnp.ones(rows.shape, jnp.float32)},
          'query': {'x': jnp.take(table.x, eval_rows, axis=0),
                    'y': jnp.take(table.y, eval_rows),
                    'mask': table.eval_mask[user]},
          'classes': table.keywords,
          'speaker': table.speakers[user]}


@functools.partial(jax.jit, static_argnames=('k_shot',))
def all_enrollment_tasks(table: EnrollmentTable, key: jax.Array, *,
                         k_shot: int) -> Task:
  """One enrollment task per user, in table order."""
  num_users = table.enroll_index.shape[0]
  sample = functools.partial(enrollment_task, k_shot=k_shot)
  return jax.vmap(sample, in_axes=(None, 0, 0))(
      table, jnp.arange(num_users), jax.random.split(key, num_users))


@functools.partial(jax.jit, static_argnames=('num_tasks', 'k_shot'))
def sample_enrollment_tasks(table: EnrollmentTable, key: jax.Array, *,
                            num_tasks: int, k_shot: int) -> Task:
  """Enrollment tasks of `num_tasks` distinct random users (meta-training)."""
  users, task_key = episodes.draw_distinct(key, table.enroll_index.shape[0],
                                           num_tasks, 'users')
  sample = functools.partial(enrollment_task, k_shot=k_shot)
  return jax.vmap(sample, in_axes=(None, 0, 0))(
      table, users, jax.random.split(task_key, num_tasks))


class ReplayBuffer(NamedTuple):
  """Labelled non-keyword clips that a device ships for enrollment.

  Fine-tuning on a user's keyword clips alone pulls every sound of that
  user's voice towards the keywords, so the user's non-keywords start to
  fire and the threshold at a fixed false-accept rate climbs. Mixing a
  small fixed set of labelled non-keyword clips of *other* speakers into
  every enrollment (experience replay, as in continual learning) keeps the
  "unknown" words competitive. Attributes: x [R, ...], y int32 [R].
  """
  x: jax.Array
  y: jax.Array


def replay_buffer(x: np.ndarray, y: np.ndarray, keywords: Sequence[int],
                  per_word: int, seed: int) -> ReplayBuffer:
  """`per_word` clips of every non-keyword word of (x, y), chosen by `seed`.

  Raises:
    ValueError: per_word < 1, or a non-keyword word with fewer clips.
  """
  if per_word < 1:
    raise ValueError(f'replay per_word must be >= 1; got {per_word}.')
  rng = np.random.default_rng(seed)
  keywords = {int(k) for k in keywords}
  rows = []
  for word in np.unique(y):
    if int(word) in keywords:
      continue
    candidates = np.flatnonzero(y == word)
    if len(candidates) < per_word:
      raise ValueError(f'Word {int(word)} has {len(candidates)} clips, fewer '
                       f'than replay per_word={per_word}.')
    rows.append(rng.choice(candidates, per_word, replace=False))
  if not rows:
    raise ValueError('Every word of the replay source is a keyword; there is '
                     'no non-keyword to replay.')
  rows = np.sort(np.concatenate(rows))
  return ReplayBuffer(x=jnp.asarray(x[rows]),
                      y=jnp.asarray(y[rows], jnp.int32))


def with_replay(tasks: Task, replay: ReplayBuffer | None) -> Task:
  """Appends the replay clips to every task's support set.

  Works on one task or on a batch with a leading task axis; the query sets
  (what is evaluated) are unchanged. `replay=None` returns `tasks` as they
  are (enrollment on keyword clips only).
  """
  if replay is None:
    return tasks
  support = tasks['support']
  lead = support['y'].shape[:-1]

  def tiled(a):
    return jnp.broadcast_to(a, lead + a.shape)

  extra = {'x': tiled(replay.x).astype(support['x'].dtype),
           'y': tiled(replay.y),
           'mask': jnp.ones(lead + replay.y.shape, support['mask'].dtype)}
  joined = {k: jnp.concatenate([support[k], extra[k]], axis=len(lead))
            for k in ('x', 'y', 'mask')}
  return {**tasks, 'support': {**support, **joined}}
