"""Outer loops: meta-train a learner on sampled tasks, and the keyword-split
N-way K-shot benchmark.

`meta_train` is thin glue around a learner's jitted `apply`: the tasks of
outer step i are sampled with `fold_in(task_key, i)` and the step runs with
`fold_in(step_key, i)`, so a run is a deterministic function of its seed,
and one resumed from a checkpoint (`checkpoint_every`) ends bit for bit
where an uninterrupted run ends.

`keyword_benchmark` reproduces the protocol of Finn et al. 2017 (after
Vinyals et al. 2016) on spoken keywords instead of Omniglot characters:
meta-train on tasks over the training keywords and training speakers, then
report the mean query accuracy (and a 95% confidence interval) over tasks
drawn from held-out keywords spoken by held-out speakers.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

from few_shot import episodes
from few_shot import learner as learner_lib
from few_shot import meta_learners
from ondevice import checkpoint as checkpoint_lib
from ondevice import metric_writer
from ondevice import models

SampleFn = Callable[[jax.Array], Any]


def meta_train(learner: learner_lib.MetaLearner,
               state: learner_lib.MetaState, sample_tasks: SampleFn, *,
               num_steps: int, key: jax.Array, log_every: int,
               workdir: str | None = None, name: str = '',
               checkpoint_every: int = 0
               ) -> tuple[learner_lib.MetaState, dict[str, float]]:
  """Runs `num_steps` outer steps; logs means of the step metrics.

  Args:
    learner: the meta-learner.
    state: its initial state.
    sample_tasks: key -> a batch of tasks (leading task axis).
    num_steps: outer steps.
    key: PRNG key of the run.
    log_every: steps between log lines / metric records.
    workdir: where metrics.jsonl goes (None: nowhere).
    name: label for log lines.
    checkpoint_every: with a workdir, save the state every this many outer
      steps and at the end, and resume from the latest checkpoint there
      (0: never).

  Returns:
    (final state, {'steps_per_second', 'final_loss', ..., 'resumed_from'}).

  Raises:
    ValueError: a checkpoint in workdir is past num_steps or does not match
      the learner's state.
  """
  task_key, step_key = jax.random.split(key)
  ckpt, first = None, 0
  if workdir and checkpoint_every > 0:
    ckpt = checkpoint_lib.Checkpointer(workdir)
    latest = ckpt.latest_step()
    if latest is not None:
      if latest > num_steps:
        raise ValueError(
            f'{name}: {ckpt.directory} holds outer step {latest}, past '
            f'num_steps={num_steps}; use a fresh workdir.')
      state = ckpt.restore(latest, state)
      first = latest
      logging.info('%s: resumed from outer step %d.', name, latest)
  last_path = os.path.join(workdir, 'last_metrics.json') if ckpt else None
  last = {}
  if first and os.path.exists(last_path):
    with open(last_path) as f:
      last = json.load(f)
  writer = metric_writer.MetricWriter(workdir, tensorboard=False) \
      if workdir else None
  window, start = [], time.time()
  for step in range(first, num_steps):
    tasks = sample_tasks(jax.random.fold_in(task_key, step))
    state, metrics = learner.apply(state, tasks,
                                   jax.random.fold_in(step_key, step))
    window.append(metrics)
    if (step + 1) % log_every == 0 or step + 1 == num_steps:
      means = {k: float(np.mean([float(m[k]) for m in window]))
               for k in window[0]}
      if not np.isfinite(means['loss']):
        raise FloatingPointError(
            f'{name}: meta-loss became {means["loss"]} at outer step '
            f'{step + 1}; lower config.meta.outer_lr or inner_lr.')
      logging.info('%s step %d/%d  %s', name, step + 1, num_steps,
                   '  '.join(f'{k} {v:.4f}' for k, v in means.items()))
      if writer:
        writer.write(step + 1, means)
      window, last = [], means
    if ckpt and ((step + 1) % checkpoint_every == 0 or
                 step + 1 == num_steps):
      ckpt.save(step + 1, state)
      tmp = last_path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(last, f)
      os.replace(tmp, last_path)
  seconds = time.time() - start
  if writer:
    writer.close()
  if ckpt:
    ckpt.close()
  ran = num_steps - first
  summary = {'steps': num_steps, 'seconds': seconds, 'resumed_from': first,
             # None when every step was restored (nothing was timed).
             'steps_per_second': ran / max(seconds, 1e-9) if ran else None}
  summary.update({f'final_{k}': v for k, v in last.items()})
  return state, summary


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
    cfg: config.keyword_split (names, train_words, test_words, n_way,
      k_shots, n_query, num_steps, tasks_per_step, eval_tasks, inner_lr,
      inner_steps, eval_inner_steps, outer_lr, reptile_step_size,
      log_every).
    train_ds, test_ds: speaker-disjoint splits (ArrayDatasets).
    model_name, model_kwargs: the model, built with n_way outputs and
      initialised from scratch (the global model saw every keyword).
    seed: run seed.
    workdir: metrics of each run go to workdir/<name>_<k>shot.

  Returns:
    {'<name>': {'<k>shot': {'mean', 'ci95', 'before_meta_training', ...}}}.
  """
  words = list(train_ds.class_names)
  train_classes = [words.index(w) for w in cfg.train_words]
  test_classes = [words.index(w) for w in cfg.test_words]
  max_k = max(cfg.k_shots)
  train_table = episodes.keyword_table(train_ds.x, train_ds.y, train_classes,
                                       min_count=max_k + cfg.n_query)
  test_table = episodes.keyword_table(test_ds.x, test_ds.y, test_classes,
                                      min_count=max_k + cfg.n_query)
  model = models.build_model(model_name, cfg.n_way, **model_kwargs)
  base = jax.random.key(seed)
  params = model.init(jax.random.fold_in(base, 0), train_ds.x[:1])['params']
  results = {}
  for name in cfg.names:
    learner = meta_learners.build_meta_learner(
        name, model, num_classes=cfg.n_way, inner_lr=cfg.inner_lr,
        inner_steps=cfg.inner_steps, eval_inner_steps=cfg.eval_inner_steps,
        outer_lr=cfg.outer_lr, reptile_step_size=cfg.reptile_step_size)
    results[name] = {}
    for k in cfg.k_shots:
      sample = lambda key, k=k: episodes.sample_keyword_tasks(
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
          workdir=os.path.join(workdir, f'{name}_{k}shot'),
          name=f'{name} {cfg.n_way}-way {k}-shot')
      after = learner.evaluate(state, eval_tasks, eval_key)
      entry = mean_and_ci(np.asarray(after['accuracy']))
      entry['before_meta_training'] = float(np.mean(before['accuracy']))
      entry['meta_train_steps_per_second'] = summary['steps_per_second']
      results[name][f'{k}shot'] = entry
      logging.info('%s %d-way %d-shot on held-out keywords: %.3f +- %.3f',
                   name, cfg.n_way, k, entry['mean'], entry['ci95'])
  return results
