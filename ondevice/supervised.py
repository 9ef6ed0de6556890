"""Centralised supervised training: `train_and_evaluate(config, workdir)`.

The loop is thin glue around the pure step of `ondevice.train`: batches are
drawn from a per-epoch permutation keyed by `fold_in(data_key, epoch)` and
every step's key is `fold_in(step_key, step)`, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run would have taken.

Research techniques arrive by injection (this module imports none of them):
`model_kwargs` (e.g. int8 `dot_general_cls`), `trainable` (which params train)
and `loss_wrapper` (e.g. a continual-learning regulariser around the loss).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ondevice import checkpoint as checkpoint_lib
from ondevice import metric_writer
from ondevice import models
from ondevice import optim
from ondevice import train
from ondevice.data import registry
from ondevice.data.base import ArrayDataset

REQUIRED_KEYS = ('data', 'model', 'num_steps', 'batch_size', 'learning_rate',
                 'seed', 'eval_every', 'log_every', 'checkpoint_every')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that needs no data, before anything is compiled."""
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ValueError(f'The config lacks the keys {missing}.')
  if config.model not in models.MODEL_NAMES:
    raise ValueError(f'config.model={config.model!r} is unknown; choose one '
                     f'of {models.MODEL_NAMES}.')
  for key in ('num_steps', 'batch_size', 'eval_every', 'log_every',
              'checkpoint_every'):
    if int(config[key]) <= 0:
      raise ValueError(f'config.{key} must be > 0; got {config[key]}.')
  if config.data.name not in registry.DATASETS:
    raise ValueError(f'config.data.name={config.data.name!r} is unknown; '
                     f'choose one of {registry.DATASETS}.')
  optim.build_optimizer(config)  # Raises on a bad optimiser field.


def validate_data(config, train_ds: ArrayDataset, test_ds: ArrayDataset):
  if config.batch_size > len(train_ds):
    raise ValueError(f'config.batch_size={config.batch_size} is larger than '
                     f'the {len(train_ds)} training examples; lower it.')
  if len(test_ds) == 0:
    raise ValueError('The test split is empty; check config.data.')


def build_model(config, num_classes: int, model_kwargs: Mapping[str, Any]):
  kwargs = dict(model_kwargs)
  if 'norm' in config:
    kwargs.setdefault('norm', config.norm)
  for key, value in config.get('model_kwargs', {}).items():
    kwargs.setdefault(key, tuple(value) if isinstance(value, list) else value)
  return models.build_model(config.model, num_classes, **kwargs)


class _EpochBatches:
  """Batch indices for step t: a slice of the permutation of epoch t // E.

  The permutation is keyed by `fold_in(data_key, epoch)`, so the batches of
  a step do not depend on where a run started; it is computed once an epoch.
  """

  def __init__(self, data_key, num_examples: int, batch_size: int):
    self._key = data_key
    self._n = num_examples
    self._batch = batch_size
    self._steps_per_epoch = num_examples // batch_size
    self._permute = jax.jit(jax.random.permutation, static_argnums=1)
    self._epoch, self._perm = -1, None

  def __call__(self, step: int) -> np.ndarray:
    epoch, offset = divmod(step, self._steps_per_epoch)
    if epoch != self._epoch:
      self._perm = np.asarray(
          self._permute(jax.random.fold_in(self._key, epoch), self._n))
      self._epoch = epoch
    return self._perm[offset * self._batch:(offset + 1) * self._batch]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    model_kwargs: Mapping[str, Any] | None = None,
    trainable: Sequence[str] | Callable[[str], bool] | None = None,
    loss_wrapper: Callable[[train.LossFn], train.LossFn] | None = None,
    datasets: tuple[ArrayDataset, ArrayDataset] | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
  """Trains `config.model` on `config.data` and evaluates on held-out data.

  Args:
    config: see configs/kws_central.py for the fields.
    workdir: where metrics.jsonl, TensorBoard summaries, checkpoints,
      learning_curve.png and final_metrics.json go. An existing checkpoint
      there is resumed.
    model_kwargs: extra keyword arguments for `models.build_model`.
    trainable: which params train (see `train.resolve_trainable`).
    loss_wrapper: wraps the task loss (e.g. with a regulariser).
    datasets: (train, test) to use instead of loading `config.data`.
    stop_after_steps: stop (after checkpointing) once this many steps are
      done, as a preempted job would; rerunning resumes. None runs to
      `config.num_steps`.

  Returns:
    Final metrics, params and model state:
    {'metrics': {...}, 'state': TrainState}.
  """
  validate_config(config)
  train_ds, test_ds = datasets or registry.load_dataset(config.data)
  validate_data(config, train_ds, test_ds)
  logging.info('Data: %d train / %d test examples, %d classes, x %s',
               len(train_ds), len(test_ds), train_ds.num_classes,
               train_ds.x.shape[1:])

  model = build_model(config, train_ds.num_classes, model_kwargs or {})
  optimizer = optim.build_optimizer(config)
  init_key, data_key, step_key = jax.random.split(
      jax.random.key(config.seed), 3)
  state = train.init_state(model, optimizer, train_ds.x[:1], init_key,
                           trainable)
  paths = train.resolve_trainable(state.params, trainable)
  num_params = sum(int(np.size(v)) for v in
                   train.flatten_params(state.params).values())
  num_trainable = sum(int(np.size(v)) for k, v in
                      train.flatten_params(state.params).items() if k in paths)
  logging.info('Model %s: %d params, %d trainable.', config.model, num_params,
               num_trainable)

  loss_fn = train.classification_loss(
      model, label_smoothing=config.get('label_smoothing', 0.0))
  if loss_wrapper is not None:
    loss_fn = loss_wrapper(loss_fn)
  step_fn = jax.jit(train.make_train_step(loss_fn, optimizer, paths),
                    donate_argnums=0)
  eval_fn = jax.jit(train.make_eval_step(model))
  eval_batch = min(config.get('eval_batch_size', 512), len(test_ds))

  ckpt = checkpoint_lib.Checkpointer(workdir)
  writer = metric_writer.MetricWriter(workdir)
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    state = ckpt.restore(start, {'state': state})['state']
    writer.truncate_after(start)
    logging.info('Resumed from checkpoint at step %d.', start)

  batch_indices = _EpochBatches(data_key, len(train_ds), config.batch_size)
  train_sums, t0, t_last = None, time.time(), time.time()
  for step in range(start, config.num_steps):
    idx = batch_indices(step)
    batch = {'x': train_ds.x[idx], 'y': train_ds.y[idx],
             'mask': np.ones(len(idx), np.float32)}
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, step))
    sums = {k: metrics[k] for k in ('loss_sum', 'correct', 'count')}
    train_sums = sums if train_sums is None else jax.tree.map(
        jnp.add, train_sums, sums)
    done = step + 1
    record = {}
    if done % config.log_every == 0 or done == config.num_steps:
      summary = train.summarize(train_sums)
      if not np.isfinite(summary['loss']):
        raise FloatingPointError(
            f'Training loss became {summary["loss"]} at step {done}; lower '
            'config.learning_rate or enable config.grad_clip.')
      record.update(train_loss=summary['loss'],
                    train_accuracy=summary['accuracy'])
      train_sums = None
      rate = config.log_every / max(time.time() - t_last, 1e-9)
      t_last = time.time()
      eta = (config.num_steps - done) / max(rate, 1e-9)
      logging.info('step %d/%d  train loss %.4f  acc %.3f  (%.1f steps/s, '
                   'ETA %.0f s)', done, config.num_steps, summary['loss'],
                   summary['accuracy'], rate, eta)
    if done % config.eval_every == 0 or done == config.num_steps:
      test = train.evaluate(eval_fn, state.params, state.model_state,
                            test_ds.x, test_ds.y, eval_batch)
      record.update(test_loss=test['loss'], test_accuracy=test['accuracy'])
      logging.info('step %d  test loss %.4f  test accuracy %.4f', done,
                   test['loss'], test['accuracy'])
    if record:
      writer.write(done, record)
    if (done % config.checkpoint_every == 0 or done == config.num_steps or
        done == stop_after_steps):
      ckpt.save(done, {'state': state})
    if done == stop_after_steps:
      logging.info('Stopping at step %d as asked; rerun to resume.', done)
      writer.close()
      ckpt.close()
      return {'metrics': {'stopped_at': done}, 'state': state}

  final = train.evaluate(eval_fn, state.params, state.model_state, test_ds.x,
                         test_ds.y, eval_batch)
  results = {'test_accuracy': final['accuracy'], 'test_loss': final['loss'],
             'num_test_examples': int(final['count']),
             'num_train_examples': len(train_ds), 'num_params': num_params,
             'num_trainable_params': num_trainable,
             'train_seconds': time.time() - t0, 'steps': config.num_steps}
  with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
    json.dump(results, f, indent=2)
  records = metric_writer.read_metrics(writer.path)
  metric_writer.plot_curves(
      records, os.path.join(workdir, 'learning_curve.png'),
      [('loss', ['train_loss', 'test_loss']),
       ('accuracy', ['train_accuracy', 'test_accuracy'])],
      title=f'{config.model} on {config.data.name}')
  writer.close()
  ckpt.close()
  print(metric_writer.markdown_table(
      [{'metric': k, 'value': v} for k, v in results.items()]))
  return {'metrics': results, 'state': state}
