"""Outer loops: meta-train a learner on sampled tasks, and the keyword-split
N-way K-shot benchmark.

`meta_train` runs a learner's jitted `apply` in the shared loop
(`ondevice.loop`): the tasks of outer step i are sampled with
`fold_in(task_key, i)` and the step runs with `fold_in(step_key, i)`, so a
run is a deterministic function of its seed, and one resumed from a
checkpoint (`checkpoint_every`) ends bit for bit where an uninterrupted run
ends.

`keyword_benchmark` reproduces the protocol of Finn et al. 2017 (after
Vinyals et al. 2016) on spoken keywords instead of Omniglot characters:
meta-train on tasks over the training keywords and training speakers, then
report the mean query accuracy (and a 95% confidence interval) over tasks
drawn from held-out keywords spoken by held-out speakers.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

from few_shot import episodes
from few_shot import learner as learner_lib
from few_shot import meta_learners
from ondevice import checkpoint as checkpoint_lib
from ondevice import loop
from ondevice import models

SampleFn = Callable[[jax.Array], Any]


def meta_train(learner: learner_lib.MetaLearner,
               state: learner_lib.MetaState, sample_tasks: SampleFn, *,
               num_steps: int, key: jax.Array, log_every: int, workdir: str,
               name: str = '', checkpoint_every: int = 0
               ) -> tuple[learner_lib.MetaState, dict[str, float]]:
  """Runs `num_steps` outer steps in `ondevice.loop`; logs step-metric means.

  Args:
    learner: the meta-learner.
    state: its initial state.
    sample_tasks: key -> a batch of tasks (leading task axis).
    num_steps: outer steps.
    key: PRNG key of the run.
    log_every: steps between log lines / metric records.
    workdir: where metrics.jsonl and checkpoints/ go; a rerun resumes from
      the newest good checkpoint there.
    name: label for log lines.
    checkpoint_every: save the state every this many outer steps (0: at the
      end only).

  Returns:
    (final state, {'steps', 'seconds', 'resumed_from', 'steps_per_second',
    'final_loss', ...}).

  Raises:
    ValueError: a checkpoint in workdir is past num_steps, or
      checkpoint_every is no multiple of log_every.
    FloatingPointError: a logged metric became non-finite.
  """
  if checkpoint_every % log_every:
    raise ValueError(f'{name}: checkpoint_every={checkpoint_every} must be a '
                     f'multiple of log_every={log_every} (a resumed run then '
                     'logs the windows an uninterrupted one logs).')
  _check_not_past(workdir, num_steps, name)
  task_key, step_key = jax.random.split(key)
  ran = []  # Steps this process took (the rest were restored).

  def step_fn(state, i):
    ran.append(i)
    tasks = sample_tasks(jax.random.fold_in(task_key, i))
    return learner.apply(state, tasks, jax.random.fold_in(step_key, i))

  result = loop.run_loop(
      state, step_fn, loop.Schedule(num_steps=num_steps, log_every=log_every,
                                    checkpoint_every=checkpoint_every),
      workdir=workdir)
  if name:
    logging.info('%s: %d outer steps in %.1f s.', name, len(ran),
                 result.seconds)
  return result.state, _summary(result, num_steps, len(ran))


def _check_not_past(workdir: str, num_steps: int, name: str) -> None:
  ckpt = checkpoint_lib.Checkpointer(workdir)
  try:
    latest = ckpt.latest_step()
  finally:
    ckpt.close()
  if latest is not None and latest > num_steps:
    raise ValueError(f'{name}: {ckpt.directory} holds outer step {latest}, '
                     f'past num_steps={num_steps}; use a fresh workdir.')


def _summary(result: loop.LoopResult, num_steps: int, ran: int
             ) -> dict[str, Any]:
  """Timing and the last logged metrics of a `meta_train` run."""
  summary = {'steps': num_steps, 'seconds': result.seconds,
             'resumed_from': num_steps - ran,
             # None when every step was restored (nothing was timed).
             'steps_per_second': (ran / max(result.seconds, 1e-9) if ran
                                  else None)}
  last = result.records[-1] if result.records else {}
  summary.update({f'final_{k}': v for k, v in last.items()
                  if k != 'step' and k not in loop.WALL_CLOCK_KEYS})
  return summary


def mean_and_ci(values: np.ndarray) -> dict[str, float]:
  """Mean and the half-width of a normal 95% confidence interval."""
  values = np.asarray(values, np.float64)
  half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) \
      if len(values) > 1 else 0.0
  return {'mean': float(values.mean()), 'ci95': float(half),
          'num_tasks': int(len(values))}


def keyword_benchmark(cfg, train_ds, test_ds, *, model_name: str,
                      model_kwargs: Mapping[str, Any], seed: int,
                      workdir: str) -> dict[str, Any]:
  """N-way K-shot accuracy on held-out keywords for each meta-learner.

  Args:
    cfg: config.keyword_split (names, one sub-config per learner, train_words,
      test_words, n_way, k_shots, n_query, num_steps, tasks_per_step,
      eval_tasks, log_every).
    train_ds, test_ds: speaker-disjoint splits (ArrayDatasets).
    model_name, model_kwargs: the model, built with n_way outputs and
      initialised from scratch (the global model saw every keyword).
    seed: run seed.
    workdir: metrics and checkpoints of each run go to
      workdir/<name>_<k>shot.

  Returns:
    {'<name>': {'<k>shot': {'mean', 'ci95', 'before_meta_training', ...}}}.
  """
  train_table, test_table = _keyword_tables(cfg, train_ds, test_ds)
  model = models.build_model(model_name, cfg.n_way, **model_kwargs)
  base = jax.random.key(seed)
  params = model.init(jax.random.fold_in(base, 0), train_ds.x[:1])['params']
  results = {}
  for name in cfg.names:
    learner = meta_learners.from_config(cfg, name, model,
                                        num_classes=cfg.n_way,
                                        key='config.keyword_split')
    results[name] = {}
    for k in cfg.k_shots:
      entry = _keyword_run(cfg, learner, params, train_table, test_table, k,
                           base, os.path.join(workdir, f'{name}_{k}shot'),
                           f'{name} {cfg.n_way}-way {k}-shot')
      results[name][f'{k}shot'] = entry
      logging.info('%s %d-way %d-shot on held-out keywords: %.3f +- %.3f',
                   name, cfg.n_way, k, entry['mean'], entry['ci95'])
  return results


def _keyword_tables(cfg, train_ds, test_ds):
  """Keyword tables of the training words (train split) and the held-out
  words (test split), each with enough clips for the largest task."""
  words = list(train_ds.class_names)
  min_count = max(cfg.k_shots) + cfg.n_query
  train_table = episodes.keyword_table(
      train_ds.x, train_ds.y, [words.index(w) for w in cfg.train_words],
      min_count=min_count)
  test_table = episodes.keyword_table(
      test_ds.x, test_ds.y, [words.index(w) for w in cfg.test_words],
      min_count=min_count)
  return train_table, test_table


def _keyword_run(cfg, learner, params, train_table, test_table, k: int,
                 base: jax.Array, workdir: str, name: str) -> dict[str, Any]:
  """Meta-trains one learner on K-shot training-word tasks; scores it on
  fixed held-out-word tasks before and after."""
  sample = lambda key: episodes.sample_keyword_tasks(
      train_table, key, num_tasks=cfg.tasks_per_step, n_way=cfg.n_way,
      k_shot=k, n_query=cfg.n_query)
  eval_tasks = episodes.sample_keyword_tasks(
      test_table, jax.random.fold_in(base, 1), num_tasks=cfg.eval_tasks,
      n_way=cfg.n_way, k_shot=k, n_query=cfg.n_query)
  state = learner.init(params)
  eval_key = jax.random.fold_in(base, 2)
  before = learner.evaluate(state, eval_tasks, eval_key)
  state, summary = meta_train(
      learner, state, sample, num_steps=cfg.num_steps,
      key=jax.random.fold_in(base, 3), log_every=cfg.log_every,
      workdir=workdir, name=name)
  after = learner.evaluate(state, eval_tasks, eval_key)
  entry = mean_and_ci(np.asarray(after['accuracy']))
  entry['before_meta_training'] = float(np.mean(before['accuracy']))
  entry['meta_train_steps_per_second'] = summary['steps_per_second']
  return entry
