"""Centralised supervised training: `run(config, workdir)`.

Thin glue around the pure step of `ondevice.train` and the shared loop of
`ondevice.loop`: the batches of step `i` are `batching.EpochBatches(data_key,
...)(i)` and its key is `fold_in(step_key, i)`, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run would have taken, and
its metrics.jsonl and final_metrics.json equal the uninterrupted run's (up to
`loop.WALL_CLOCK_KEYS`).

The whole config is checked by `validate_config` before any data loads. Parts
chosen by name are resolved here, in one place: the quant mode
(`quantized_training.get_quant(config.quant)`), the optimiser state format
and QAS (`config.optimizer_state`, `config.qas`, see
`quantized_training.optimizers`), and the trainable preset
(`config.trainable`, see `sparse_updates.presets`). Callers that train a
global model for their own study may also inject `model_kwargs`, `trainable`
and `loss_wrapper` (e.g. a continual-learning regulariser) and their own
`datasets` through `train_and_evaluate`.

An optional `config.augment` section (`time_mask`, `freq_mask`, `max_shift`,
see `ondevice.augment`) trains on SpecAugment views of every batch; all
zeros, or no section, trains on the clips as they are.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from ondevice import augment
from ondevice import batching
from ondevice import checkpoint as checkpoint_lib
from ondevice import loop
from ondevice import metric_writer
from ondevice import models
from ondevice import optim
from ondevice import options
from ondevice import train
from ondevice.data import registry
from ondevice.data.base import ArrayDataset
import quantized_training
from quantized_training import optimizers as quant_optimizers
import sparse_updates

REQUIRED_KEYS = ('data.name', 'model', 'num_steps', 'batch_size',
                 'learning_rate', 'seed', 'eval_every', 'log_every',
                 'checkpoint_every')
Trainable = Sequence[str] | Callable[[str], bool] | None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that needs no data, before anything loads."""
  options.require(config, REQUIRED_KEYS)
  options.one_of(config, 'model', models.MODEL_NAMES)
  options.positive(config, 'num_steps', 'batch_size', 'log_every')
  options.non_negative(config, 'eval_every', 'checkpoint_every')
  if config.checkpoint_every % config.log_every:
    raise ValueError(
        f'config.checkpoint_every={config.checkpoint_every} must be a '
        f'multiple of config.log_every={config.log_every}, so that a resumed '
        'run logs the same windows as an uninterrupted one.')
  if 'eval_batch_size' in config:
    options.positive(config, 'eval_batch_size')
  if 'label_smoothing' in config:
    options.in_range(config, 'label_smoothing', 0.0, 1.0,
                     high_inclusive=False)
  if config.get('norm', None) is not None:
    options.one_of(config, 'norm', models.NORMS)
  registry.validate_data_config(config.data)
  optim.build_optimizer(config)  # Raises on a bad optimiser field.
  quantized_training.get_quant(config.get('quant', 'none'))
  quant_optimizers.validate(config)
  _validate_trainable(config)
  if config.get('augment', None) is not None:
    augment.validate(config.augment)


def _validate_trainable(config) -> None:
  if 'trainable' not in config:
    return
  table = sparse_updates.presets.PRESET_BUILDERS
  options.selected(config.trainable, table, 'config.trainable')
  if config.trainable.name == 'lite_residual':
    # Central models are plain `models.build_model` models: no lite residual
    # branches, so the preset would silently train biases only.
    raise ValueError(
        "config.trainable.name='lite_residual' trains lite residual branches, "
        f'but config.model={config.model!r} has none; choose another of '
        f'{sorted(table)}.')


def validate_data(config, train_ds: ArrayDataset, test_ds: ArrayDataset):
  if config.batch_size > len(train_ds):
    raise ValueError(f'config.batch_size={config.batch_size} is larger than '
                     f'the {len(train_ds)} training examples; lower it.')
  if len(test_ds) == 0:
    raise ValueError('The test split is empty; check config.data.')
  if config.get('augment', None) is not None:
    augment.validate(config.augment, feature_shape=train_ds.x.shape[1:])


def build_model(config, num_classes: int,
                model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
  """`config.model` with `config.norm`, `config.model_kwargs` and the hooks."""
  kwargs = dict(model_kwargs or {})
  if 'norm' in config:
    kwargs.setdefault('norm', config.norm)
  for key, value in config.get('model_kwargs', {}).items():
    kwargs.setdefault(key, tuple(value) if isinstance(value, list) else value)
  return models.build_model(config.model, num_classes, **kwargs)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run builds from the config and the training data.

  Attributes:
    model: the classifier.
    state: the initial TrainState (params in the training domain).
    step: the jitted `(state, batch, rng) -> (state, metrics)`.
    to_model: training-domain params -> the model's float params (QAS
      trains integer-domain weights; identity otherwise).
    num_params, num_trainable: parameter counts.
  """
  model: nn.Module
  state: train.TrainState
  step: Callable[..., Any]
  to_model: Callable[[Any], Any]
  num_params: int
  num_trainable: int


def _trainable_paths(config, params, trainable: Trainable):
  """(paths, channel masks or None): injected, else `config.trainable`."""
  if trainable is not None or 'trainable' not in config:
    return train.resolve_trainable(params, trainable), None
  factory_kwargs = options.selected(config.trainable,
                                    sparse_updates.presets.PRESET_BUILDERS,
                                    'config.trainable')[1]
  scheme = sparse_updates.resolve(config.trainable.name, params,
                                  key=jax.random.key(config.seed),
                                  **factory_kwargs)
  return scheme.paths, scheme.masks


def prepare(config, train_ds: ArrayDataset, *,
            model_kwargs: Mapping[str, Any] | None = None,
            trainable: Trainable = None,
            loss_wrapper: Callable[[train.LossFn], train.LossFn] | None = None
            ) -> Setup:
  """Builds the model, the initial state and the jitted step."""
  quant = quantized_training.get_quant(config.get('quant', 'none'))
  model = build_model(config, train_ds.num_classes,
                      {**quant.model_kwargs(), **(model_kwargs or {})})
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  initial = train.init_state(model, optax.identity(), train_ds.x[:1], init_key)
  params, variables = initial.params, initial.model_state
  paths, masks = _trainable_paths(config, params, trainable)
  optimizer = optim.build_optimizer(config)
  if masks:
    optimizer = sparse_updates.masked_optimizer(optimizer, masks)
  domain = quant_optimizers.build(config, params, paths, optimizer)
  loss_fn = train.classification_loss(
      model, label_smoothing=config.get('label_smoothing', 0.0))
  if loss_wrapper is not None:
    loss_fn = loss_wrapper(loss_fn)
  if augment.is_enabled(config.get('augment', None)):
    # Outermost, so a regulariser from loss_wrapper sees the same view.
    loss_fn = augment.with_augmentation(loss_fn, **config.augment)
  state = train.state_from_params(domain.to_train(params), variables,
                                  domain.optimizer, paths)
  step = jax.jit(train.make_train_step(domain.wrap_loss(loss_fn),
                                       domain.optimizer, paths),
                 donate_argnums=0)
  flat = train.flatten_params(params)
  num_trainable = sum(int(np.size(flat[p])) for p in paths)
  return Setup(model, state, step, domain.to_model,
               sum(int(np.size(v)) for v in flat.values()), num_trainable)


def _loop_functions(config, setup: Setup, train_ds, test_ds):
  """(step_fn, eval_fn) for `loop.run_loop`."""
  _, data_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
  batches = batching.EpochBatches(data_key, len(train_ds), config.batch_size)
  eval_step = jax.jit(train.make_eval_step(setup.model))
  eval_batch = min(config.get('eval_batch_size', 512), len(test_ds))

  def step_fn(state, i):
    state, metrics = setup.step(state, batches.batch(i, train_ds.x, train_ds.y),
                                jax.random.fold_in(step_key, i))
    return state, {k: metrics[k] for k in ('loss_sum', 'correct', 'count')}

  def eval_fn(state):
    out = train.evaluate(eval_step, setup.to_model(state.params),
                         state.model_state, test_ds.x, test_ds.y, eval_batch)
    return {'test_loss': out['loss'], 'test_accuracy': out['accuracy']}

  return step_fn, eval_fn


def _summarize(sums: Mapping[str, Any], num_steps: int) -> dict[str, float]:
  del num_steps  # Means are over examples, not steps.
  summary = train.summarize(sums)
  return {'train_loss': summary['loss'], 'train_accuracy': summary['accuracy']}


def _schedule(config, stop_after_steps: int | None) -> loop.Schedule:
  return loop.Schedule(num_steps=config.num_steps, log_every=config.log_every,
                       eval_every=config.eval_every,
                       checkpoint_every=config.checkpoint_every,
                       stop_after=stop_after_steps)


def _final_metrics(config, setup: Setup, result: loop.LoopResult,
                   datasets: tuple[ArrayDataset, ArrayDataset]
                   ) -> dict[str, Any]:
  """The last evaluation row of the loop, with the run's sizes."""
  last = [r for r in result.records if 'test_accuracy' in r][-1]
  return {'test_accuracy': last['test_accuracy'],
          'test_loss': last['test_loss'],
          'num_test_examples': len(datasets[1]),
          'num_train_examples': len(datasets[0]), 'num_params': setup.num_params,
          'num_trainable_params': setup.num_trainable,
          'train_seconds': result.seconds, 'steps': config.num_steps}


def _write_outputs(config, workdir: str, results: Mapping[str, Any],
                   records: Sequence[Mapping[str, Any]]) -> None:
  with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
    json.dump(results, f, indent=2)
  metric_writer.plot_curves(
      records, os.path.join(workdir, 'learning_curve.png'),
      [('loss', ['train_loss', 'test_loss']),
       ('accuracy', ['train_accuracy', 'test_accuracy'])],
      title=f'{config.model} on {config.data.name}')
  print(metric_writer.markdown_table(
      [{'metric': k, 'value': v} for k, v in results.items()]))


def _load_data(config, datasets) -> tuple[ArrayDataset, ArrayDataset]:
  train_ds, test_ds = datasets or registry.load_dataset(config.data)
  validate_data(config, train_ds, test_ds)
  logging.info('Data: %d train / %d test examples, %d classes, x %s',
               len(train_ds), len(test_ds), train_ds.num_classes,
               train_ds.x.shape[1:])
  return train_ds, test_ds


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    model_kwargs: Mapping[str, Any] | None = None,
    trainable: Trainable = None,
    loss_wrapper: Callable[[train.LossFn], train.LossFn] | None = None,
    datasets: tuple[ArrayDataset, ArrayDataset] | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
  """Trains `config.model` on `config.data` and evaluates on held-out data.

  Args:
    config: see configs/kws_central.py for the fields.
    workdir: where metrics.jsonl, checkpoints, learning_curve.png and
      final_metrics.json go. An existing checkpoint there is resumed.
    model_kwargs: extra keyword arguments for `models.build_model` (they
      win over the quant mode's hooks).
    trainable: which params train (see `train.resolve_trainable`); None
      uses `config.trainable` when the config has one, else every param.
    loss_wrapper: wraps the task loss (e.g. with a regulariser).
    datasets: (train, test) to use instead of loading `config.data`.
    stop_after_steps: stop (after checkpointing) once this many steps are
      done, as a preempted job would; rerunning resumes.

  Returns:
    {'metrics': final metrics, 'state': TrainState with the model's float
    params, 'model': the module}; when stopped early, metrics is
    {'stopped_at': step}.

  Raises:
    FloatingPointError: training became non-finite (names the step).
  """
  validate_config(config)
  train_ds, test_ds = _load_data(config, datasets)
  setup = prepare(config, train_ds, model_kwargs=model_kwargs,
                  trainable=trainable, loss_wrapper=loss_wrapper)
  logging.info('Model %s: %d params, %d trainable.', config.model,
               setup.num_params, setup.num_trainable)
  step_fn, eval_fn = _loop_functions(config, setup, train_ds, test_ds)
  result = loop.run_loop(setup.state, step_fn,
                         _schedule(config, stop_after_steps), workdir=workdir,
                         config=config, eval_fn=eval_fn, summarize=_summarize)
  state = result.state._replace(params=setup.to_model(result.state.params))
  if result.stopped_early:
    return {'metrics': {'stopped_at': stop_after_steps}, 'state': state,
            'model': setup.model}
  results = _final_metrics(config, setup, result, (train_ds, test_ds))
  _write_outputs(config, workdir, results, result.records)
  return {'metrics': results, 'state': state, 'model': setup.model}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The central binary's entry point: trains, evaluates, returns metrics."""
  return train_and_evaluate(config, workdir)['metrics']


def is_finished(workdir: str) -> bool:
  """Whether `workdir` holds a completed run (final_metrics.json)."""
  return os.path.exists(os.path.join(workdir, 'final_metrics.json'))


def _check_same_data(workdir: str, metrics: dict[str, Any],
                     train_ds: ArrayDataset, test_ds: ArrayDataset) -> None:
  """Raises ValueError when the finished run counted other examples than
  the data given now (e.g. another speaker pool): reusing it would report
  a model of other data as this run's."""
  for split, ds in (('train', train_ds), ('test', test_ds)):
    recorded = metrics.get(f'num_{split}_examples')
    if recorded is not None and int(recorded) != len(ds):
      raise ValueError(
          f'{workdir} was trained with {int(recorded)} {split} examples, '
          f'this run has {len(ds)}: its data (corpus, split or speaker '
          'pool) differs. Point the run at another work directory, or '
          'restore the data it was trained on.')


def restore(config: ml_collections.ConfigDict, workdir: str, *,
            datasets: tuple[ArrayDataset, ArrayDataset] | None = None,
            model_kwargs: Mapping[str, Any] | None = None,
            trainable: Trainable = None) -> dict[str, Any]:
  """The finished run in `workdir`, without training or evaluating again.

  Returns:
    {'metrics': final_metrics.json, 'state': TrainState at the last step,
    'model': the module}.

  Raises:
    ValueError: `workdir` holds no finished run of `config`.
  """
  validate_config(config)
  if not is_finished(workdir):
    raise ValueError(f'{workdir} holds no finished run (no '
                     'final_metrics.json); train it with train_and_evaluate.')
  train_ds, test_ds = _load_data(config, datasets)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    metrics = json.load(f)
  _check_same_data(workdir, metrics, train_ds, test_ds)
  setup = prepare(config, train_ds, model_kwargs=model_kwargs,
                  trainable=trainable)
  ckpt = checkpoint_lib.Checkpointer(workdir, config=config)
  try:
    found = ckpt.restore_latest({'state': setup.state, 'totals': {}})
  finally:
    ckpt.close()
  if found is None or found[0] != config.num_steps:
    raise ValueError(f'{workdir} has final_metrics.json but no checkpoint at '
                     f'step {config.num_steps}; delete it to retrain.')
  state = found[1]['state']
  return {'metrics': metrics,
          'state': state._replace(params=setup.to_model(state.params)),
          'model': setup.model}
