"""Few-shot episodes sampled on device: keyword tasks and per-speaker tasks.

Two kinds of task, both as in the few-shot literature (Vinyals et al. 2016,
"Matching Networks for One Shot Learning"; Finn et al. 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks"):

* keyword tasks: N-way K-shot over keywords. N classes are drawn from one
  keyword set (train and test keyword sets are disjoint), K support and Q
  query examples are drawn per class from any speaker, and labels are
  relabelled 0..N-1 in the order the classes were drawn.
* speaker tasks: one user's enrollment. For every keyword of the table, K of
  the speaker's utterances form the support set and the speaker's remaining
  utterances the query set; labels stay the model's global word indices, so
  the task adapts the full keyword classifier to the user.

Index tables are built host-side once (NumPy, outside jit) and hold the
features of the rows they index, so sampling is a pure function
`(table, key) -> task` that jits and vmaps over a batch of keys:

    table = keyword_table(ds.x, ds.y, classes=train_words)
    tasks = sample_keyword_tasks(table, key, num_tasks=8, n_way=5, k_shot=1,
                                 n_query=5)           # leading task axis
    tasks['support']['x'].shape  # [8, 5 * 1, 98, 40]

A task is {'support': batch, 'query': batch, 'classes': [N]}, where a batch is
the {'x', 'y', 'mask'} dict of `ondevice.train`, so any loss built there
applies to either set unchanged. Padded query slots (a speaker with fewer
utterances of a word) have mask 0. Enrollment tasks for personalisation,
whose query also holds the user's non-keyword utterances, are in
`few_shot.enrollment`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Task = dict[str, Any]


class KeywordTable(NamedTuple):
  """Examples of each class of one keyword set.

  Attributes:
    x: features of the indexed rows only, [M, ...].
    index: int32 [C, W]: rows of x holding class c, padded with 0.
    count: int32 [C]: valid entries of each row of `index`.
    labels: int32 [C]: the dataset label of each table class.
  """
  x: jax.Array
  index: jax.Array
  count: jax.Array
  labels: jax.Array


class SpeakerTable(NamedTuple):
  """Utterances of each (speaker, keyword).

  Attributes:
    x: features of the indexed rows only, [M, ...].
    index: int32 [S, C, U]: rows of x of speaker s saying keyword c, padded.
    count: int32 [S, C]: valid entries of each [s, c] row of `index`.
    labels: int32 [C]: the dataset (model) label of each keyword.
    speakers: int32 [S]: the dataset client id of each speaker.
  """
  x: jax.Array
  index: jax.Array
  count: jax.Array
  labels: jax.Array
  speakers: jax.Array


def _padded_rows(groups: Sequence[np.ndarray], width: int) -> np.ndarray:
  out = np.zeros((len(groups), width), np.int32)
  for i, rows in enumerate(groups):
    out[i, :len(rows)] = rows
  return out


def keyword_table(x: np.ndarray, y: np.ndarray, classes: Sequence[int],
                  min_count: int = 1) -> KeywordTable:
  """Indexes the examples of `classes` (host-side, once).

  Args:
    x: features [N, ...] of a dataset split.
    y: int labels [N].
    classes: dataset labels that make up this keyword set.
    min_count: every class needs at least this many examples (K + Q of the
      episodes to be drawn).

  Raises:
    ValueError: repeated or absent classes, or a class with too few examples.
  """
  classes = [int(c) for c in classes]
  if len(set(classes)) != len(classes) or not classes:
    raise ValueError(f'classes must be distinct and non-empty; got {classes}.')
  rows = [np.flatnonzero(y == c) for c in classes]
  short = {c: len(r) for c, r in zip(classes, rows) if len(r) < min_count}
  if short:
    raise ValueError(
        f'Classes {short} (label: count) have fewer than {min_count} examples '
        '(k_shot + n_query); lower k_shot / n_query or add utterances.')
  used = np.concatenate(rows)
  local = np.split(np.arange(len(used), dtype=np.int32),
                   np.cumsum([len(r) for r in rows])[:-1])
  return KeywordTable(
      x=jnp.asarray(x[used]),
      index=jnp.asarray(_padded_rows(local, max(len(r) for r in rows))),
      count=jnp.asarray([len(r) for r in rows], jnp.int32),
      labels=jnp.asarray(classes, jnp.int32))


def speaker_table(x: np.ndarray, y: np.ndarray, client_id: np.ndarray,
                  classes: Sequence[int],
                  speakers: Sequence[int] | None = None) -> SpeakerTable:
  """Indexes every speaker's utterances of each keyword in `classes`.

  Args:
    x: features [N, ...]; y: labels [N]; client_id: speaker of each row [N].
    classes: the keywords (dataset labels) of every speaker task.
    speakers: client ids to include, in order; None takes every speaker.

  Raises:
    ValueError: a speaker without any utterance of some keyword.
  """
  classes = [int(c) for c in classes]
  speakers = (np.unique(client_id) if speakers is None
              else np.asarray(speakers))
  groups, missing = [], []
  for s in speakers:
    for c in classes:
      rows = np.flatnonzero((client_id == s) & (y == c))
      if not len(rows):
        missing.append((int(s), c))
      groups.append(rows)
  if missing:
    raise ValueError(f'(speaker, keyword) pairs {missing[:5]} have no '
                     'utterance; drop those speakers or keywords.')
  used = np.concatenate(groups)
  local = np.split(np.arange(len(used), dtype=np.int32),
                   np.cumsum([len(r) for r in groups])[:-1])
  width = max(len(r) for r in groups)
  shape = (len(speakers), len(classes))
  return SpeakerTable(
      x=jnp.asarray(x[used]),
      index=jnp.asarray(_padded_rows(local, width).reshape(shape + (width,))),
      count=jnp.asarray([len(r) for r in groups], jnp.int32).reshape(shape),
      labels=jnp.asarray(classes, jnp.int32),
      speakers=jnp.asarray(speakers, jnp.int32))


def _shuffled_slots(uniform: jax.Array, count: jax.Array) -> jax.Array:
  """Orders the slots of padded rows: the valid ones [0, count) first, in
  the random order of `uniform` [..., width] (one draw for every row keeps
  the compiled sampler small)."""
  width = uniform.shape[-1]
  valid = jnp.arange(width) < jnp.asarray(count)[..., None]
  return jnp.argsort(jnp.where(valid, uniform, 2.0), axis=-1)


def _batch(x: jax.Array, rows: jax.Array, labels: jax.Array,
           mask: jax.Array) -> dict[str, jax.Array]:
  rows, labels, mask = rows.reshape(-1), labels.reshape(-1), mask.reshape(-1)
  return {'x': jnp.take(x, rows, axis=0), 'y': labels.astype(jnp.int32),
          'mask': mask.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=('n_way', 'k_shot', 'n_query'))
def sample_keyword_task(table: KeywordTable, key: jax.Array, *, n_way: int,
                        k_shot: int, n_query: int) -> Task:
  """One N-way K-shot task; labels are 0..n_way-1 in draw order.

  Every class of the table must have at least k_shot + n_query examples
  (checked by `keyword_table(min_count=...)`); support and query examples
  of a class are distinct.
  """
  num_classes, width = table.index.shape
  if not 1 <= n_way <= num_classes:
    raise ValueError(f'n_way={n_way} must lie in [1, {num_classes}] (the '
                     'classes of this keyword set).')
  if k_shot < 1 or n_query < 1 or k_shot + n_query > width:
    raise ValueError(f'Need k_shot >= 1, n_query >= 1 and k_shot + n_query '
                     f'<= {width} examples per class; got {k_shot} + '
                     f'{n_query}.')
  uniform = jax.random.uniform(key, (num_classes, width + 1))
  chosen = jnp.argsort(uniform[:, 0])[:n_way]
  slots = _shuffled_slots(uniform[chosen, 1:], table.count[chosen])
  rows = jnp.take_along_axis(table.index[chosen],
                             slots[:, :k_shot + n_query], axis=1)
  labels = jnp.broadcast_to(jnp.arange(n_way)[:, None], rows.shape)
  ones = jnp.ones(rows.shape)
  return {'support': _batch(table.x, rows[:, :k_shot], labels[:, :k_shot],
                            ones[:, :k_shot]),
          'query': _batch(table.x, rows[:, k_shot:], labels[:, k_shot:],
                          ones[:, k_shot:]),
          'classes': table.labels[chosen]}


@functools.partial(jax.jit, static_argnames=('k_shot',))
def speaker_task(table: SpeakerTable, speaker: jax.Array, key: jax.Array, *,
                 k_shot: int) -> Task:
  """The enrollment task of table speaker `speaker` (a position, not an id).

  Support: k_shot random utterances of each keyword. Query: the speaker's
  other utterances, padded to the table width minus k_shot with mask 0.
  Labels are the model's labels (`table.labels`). A (speaker, keyword) with
  k_shot or fewer utterances gets masked support slots and no query.
  """
  _, num_classes, width = table.index.shape
  if not 1 <= k_shot < width:
    raise ValueError(f'k_shot={k_shot} must lie in [1, {width - 1}]: the '
                     f'table has at most {width} utterances per keyword, one '
                     'of which must be left as a query.')
  counts = table.count[speaker]
  slots = _shuffled_slots(jax.random.uniform(key, (num_classes, width)),
                          counts)
  rows = jnp.take_along_axis(table.index[speaker], slots, axis=1)
  valid = jnp.arange(width)[None, :] < counts[:, None]
  labels = jnp.broadcast_to(table.labels[:, None], rows.shape)
  task = {'support': _batch(table.x, rows[:, :k_shot], labels[:, :k_shot],
                            valid[:, :k_shot]),
          'query': _batch(table.x, rows[:, k_shot:], labels[:, k_shot:],
                          valid[:, k_shot:]),
          'classes': table.labels,
          'speaker': table.speakers[speaker]}
  return task


@functools.partial(jax.jit,
                   static_argnames=('num_tasks', 'n_way', 'k_shot', 'n_query'))
def sample_keyword_tasks(table: KeywordTable, key: jax.Array, *,
                         num_tasks: int, n_way: int, k_shot: int,
                         n_query: int) -> Task:
  """`num_tasks` independent keyword tasks stacked on a leading axis."""
  sample = functools.partial(sample_keyword_task, n_way=n_way, k_shot=k_shot,
                             n_query=n_query)
  return jax.vmap(sample, in_axes=(None, 0))(
      table, jax.random.split(key, num_tasks))


def draw_distinct(key: jax.Array, population: int, count: int,
                  what: str) -> tuple[jax.Array, jax.Array]:
  """`count` distinct indices of range(population) in random order, and the
  key left for sampling their tasks.

  Raises:
    ValueError: count > population (`what` names the population).
  """
  if count > population:
    raise ValueError(f'num_tasks={count} exceeds the {population} {what} of '
                     'the table; lower the meta-batch size.')
  pick_key, task_key = jax.random.split(key)
  order = jnp.argsort(jax.random.uniform(pick_key, (population,)))
  return order[:count], task_key


@functools.partial(jax.jit, static_argnames=('num_tasks', 'k_shot'))
def sample_speaker_tasks(table: SpeakerTable, key: jax.Array, *,
                         num_tasks: int, k_shot: int) -> Task:
  """Tasks of `num_tasks` distinct speakers drawn at random."""
  speakers, task_key = draw_distinct(key, table.index.shape[0], num_tasks,
                                     'speakers')
  sample = functools.partial(speaker_task, k_shot=k_shot)
  return jax.vmap(sample, in_axes=(None, 0, 0))(
      table, speakers, jax.random.split(task_key, num_tasks))


@functools.partial(jax.jit, static_argnames=('k_shot',))
def all_speaker_tasks(table: SpeakerTable, key: jax.Array, *,
                      k_shot: int) -> Task:
  """One task per table speaker, in table order (for evaluation)."""
  num_speakers = table.index.shape[0]
  sample = functools.partial(speaker_task, k_shot=k_shot)
  return jax.vmap(sample, in_axes=(None, 0, 0))(
      table, jnp.arange(num_speakers), jax.random.split(key, num_speakers))
