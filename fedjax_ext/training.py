"""A federated training run: `train_and_evaluate(config, workdir)`.

Turns a config (see configs/fed_kws.py) into an algorithm from
`fedjax_ext.algorithms`, then loops: sample a cohort with the round's key,
gather it into padded arrays, run the round in one jitted call, log, evaluate
the server model on held-out clients, checkpoint. Every key of round r is
`fold_in(round_key, r)` and the checkpoint holds the whole server state
(round number included), so a resumed run repeats an uninterrupted one bit
for bit.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from fedjax_ext import aggregators
from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import compression
from fedjax_ext import execution
from fedjax_ext import privacy
from fedjax_ext import rounds as rounds_lib
from ondevice import checkpoint as checkpoint_lib
from ondevice import metric_writer
from ondevice import models
from ondevice import train
from ondevice.data import partition
from ondevice.data import registry
from ondevice.data.base import ArrayDataset
from sparse_updates import presets

REQUIRED_KEYS = ('data', 'model', 'algorithm', 'num_rounds', 'cohort_size',
                 'local', 'client_learning_rate', 'server_learning_rate',
                 'max_examples_per_client', 'seed', 'eval_every',
                 'checkpoint_every')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that need no data, before anything is compiled."""
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ValueError(f'The config lacks the keys {missing}.')
  if config.model not in models.MODEL_NAMES:
    raise ValueError(f'config.model={config.model!r} is unknown; choose one '
                     f'of {models.MODEL_NAMES}.')
  if config.algorithm not in algorithms.ALGORITHMS:
    raise ValueError(f'config.algorithm={config.algorithm!r} is unknown; '
                     f'choose one of {sorted(algorithms.ALGORITHMS)}.')
  for key in ('num_rounds', 'cohort_size', 'max_examples_per_client',
              'eval_every', 'checkpoint_every'):
    if int(config[key]) <= 0:
      raise ValueError(f'config.{key} must be > 0; got {config[key]}.')
  for key in ('client_learning_rate', 'server_learning_rate'):
    if not config[key] > 0:
      raise ValueError(f'config.{key} must be > 0; got {config[key]}.')
  if config.local.batch_size <= 0:
    raise ValueError('config.local.batch_size must be > 0; got '
                     f'{config.local.batch_size}.')
  if config.get('trainable', 'full') not in presets.PRESETS:
    raise ValueError(f'config.trainable={config.trainable!r} is unknown; '
                     f'choose one of {presets.PRESETS}.')
  dp = config.get('dp', None)
  if dp is not None and dp.enabled and config.algorithm == 'scaffold':
    raise ValueError('config.dp.enabled with config.algorithm=scaffold is '
                     'not supported: SCAFFOLD shares control variates that '
                     'DP-FedAvg does not clip.')


def partition_clients(config, train_ds: ArrayDataset, test_ds: ArrayDataset
                      ) -> tuple[ArrayDataset, ArrayDataset]:
  """Gives datasets without natural clients a Dirichlet partition."""
  part = config.get('partition', None)
  if part is None or part.kind == 'natural':
    if np.all(train_ds.client_id < 0):
      raise ValueError(f'{config.data.name} has no natural clients; set '
                       "config.partition.kind='dirichlet' or 'iid'.")
    return train_ds, test_ds
  if part.kind == 'dirichlet':
    ids = partition.dirichlet_partition(train_ds.y, part.num_clients,
                                        part.alpha, part.seed)
  elif part.kind == 'iid':
    ids = partition.iid_partition(train_ds.y, part.num_clients, part.seed)
  else:
    raise ValueError(f'config.partition.kind={part.kind!r} is unknown; '
                     "choose 'natural', 'dirichlet' or 'iid'.")
  return partition.assign_clients(train_ds, ids), test_ds


def _rounds_config(config, num_train_clients: int) -> rounds_lib.RoundConfig:
  transform = compression.get_compression(
      config.compression.name,
      **{k: v for k, v in config.compression.items() if k != 'name'})
  aggregator, stateful = None, None
  dp = config.get('dp', None)
  if dp is not None and dp.enabled:
    dp_config = privacy.DPConfig(
        noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm,
        expected_num_clients=config.cohort_size, adaptive=dp.adaptive,
        target_quantile=dp.target_quantile)
    stateful = privacy.dp_aggregator(dp_config)
  elif config.aggregator.name != 'mean' or len(config.aggregator) > 1:
    aggregator = aggregators.get_aggregator(
        config.aggregator.name,
        **{k: v for k, v in config.aggregator.items() if k != 'name'})
  # else: the round's own weighted mean (None), which execution 'auto' can
  # stream client by client.
  del num_train_clients
  return rounds_lib.RoundConfig(
      aggregator=aggregator, stateful_aggregator=stateful,
      transform=transform, dropout_rate=config.get('dropout_rate', 0.0),
      uniform_weights=bool(dp is not None and dp.enabled),
      execution=execution.ExecutionConfig(
          strategy=config.get('execution', 'auto')))


def trainable_from_config(config, params) -> tuple[str, ...] | None:
  """The paths clients train and send under `config.trainable`.

  A `sparse_updates` preset name (full, bias_only, norm_only,
  classifier_only, last_k, tte, ...; arguments in config.trainable_kwargs)
  applied to `params` in `model.init` order. Presets that train part of a
  leaf's channels are refused: a client sends whole leaves.
  """
  name = config.get('trainable', 'full') or 'full'
  if name == 'full':
    return None
  scheme = presets.resolve(name, params,
                           **dict(config.get('trainable_kwargs', {})))
  if scheme.masks:
    raise ValueError(
        f'config.trainable={name!r} trains part of the channels of '
        f'{sorted(scheme.masks)}; federated clients send whole leaves, so '
        'use a whole-leaf scheme (bias_only, norm_only, classifier_only, '
        'last_k, tte with weight_fraction=1).')
  return scheme.paths


def build_algorithm(config, loss_fn, num_train_clients: int,
                    trainable) -> algorithms.FederatedAlgorithm:
  """The `(init, apply)` pair named by `config.algorithm`."""
  local = client_lib.LocalConfig(
      batch_size=config.local.batch_size,
      num_steps=config.local.get('num_steps', None) or None,
      num_epochs=config.local.get('num_epochs', None) or None,
      trainable=trainable)
  round_config = _rounds_config(config, num_train_clients)
  extra = dict(config.get('algorithm_kwargs', {}))
  if config.algorithm == 'scaffold':
    return algorithms.scaffold(
        loss_fn, config.client_learning_rate, local,
        num_clients=num_train_clients,
        server_learning_rate=config.server_learning_rate, rounds=round_config,
        **extra)
  client_opt = optax.sgd(config.client_learning_rate,
                         momentum=config.get('client_momentum', 0.0) or None)
  return algorithms.ALGORITHMS[config.algorithm](
      loss_fn, client_opt, local,
      server_learning_rate=config.server_learning_rate, rounds=round_config,
      **extra)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    model_kwargs: Mapping[str, Any] | None = None,
    trainable: Sequence[str] | Callable[[str], bool] | None = None,
    datasets: tuple[ArrayDataset, ArrayDataset] | None = None,
    stop_after_rounds: int | None = None,
) -> dict[str, Any]:
  """Runs `config.num_rounds` federated rounds and evaluates the server model.

  Args:
    config: see configs/fed_kws.py.
    workdir: metrics.jsonl, TensorBoard, checkpoints, accuracy_vs_round.png,
      final_metrics.json. An existing checkpoint there is resumed.
    model_kwargs: extra `models.build_model` arguments (e.g. int8 hooks).
    trainable: which params clients train and send.
    datasets: (train, test) instead of loading `config.data`.
    stop_after_rounds: stop after this round (checkpointed), as a preempted
      job would; rerunning resumes.

  Returns:
    {'metrics': final metrics, 'state': server state}.
  """
  validate_config(config)
  train_ds, test_ds = datasets or registry.load_dataset(config.data)
  train_ds, test_ds = partition_clients(config, train_ds, test_ds)
  pool = cohort_lib.ClientPool.from_dataset(train_ds)
  if config.cohort_size > pool.num_clients:
    raise ValueError(f'config.cohort_size={config.cohort_size} exceeds the '
                     f'{pool.num_clients} training clients with data.')
  logging.info('Federated data: %d clients (%d skipped as empty), %d train / '
               '%d test examples.', pool.num_clients, pool.num_empty,
               len(train_ds), len(test_ds))

  kwargs = dict(model_kwargs or {})
  kwargs.setdefault('norm', config.get('norm', None))
  for key, value in config.get('model_kwargs', {}).items():
    kwargs.setdefault(key, tuple(value) if isinstance(value, list) else value)
  model = models.build_model(config.model, train_ds.num_classes, **kwargs)
  init_key, round_key = jax.random.split(jax.random.key(config.seed))
  state0 = train.init_state(model, optax.sgd(1.0), train_ds.x[:1], init_key)
  if trainable is None:
    trainable = trainable_from_config(config, state0.params)
  loss_fn = train.classification_loss(model)
  algorithm = build_algorithm(config, loss_fn, pool.num_clients, trainable)
  state = algorithm.init(state0.params, state0.model_state)
  paths = train.resolve_trainable(state0.params, trainable)
  flat = train.flatten_params(state0.params)
  bytes_float32 = sum(int(np.size(flat[p])) * 4 for p in paths)
  num_params = sum(int(np.size(v)) for v in flat.values())
  logging.info('Model %s: %d params, %d trainable (%d bytes as float32); '
               'algorithm %s, cohort %d, %d rounds.', config.model,
               num_params, sum(int(np.size(flat[p])) for p in paths),
               bytes_float32, config.algorithm, config.cohort_size,
               config.num_rounds)

  eval_fn = jax.jit(train.make_eval_step(model))
  eval_batch = min(config.get('eval_batch_size', 512), len(test_ds))
  ckpt = checkpoint_lib.Checkpointer(workdir)
  writer = metric_writer.MetricWriter(workdir)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), {'server': state})['server']
    writer.truncate_after(int(state.round))
    logging.info('Resumed at round %d.', int(state.round))

  dp = config.get('dp', None)
  t0 = t_last = time.time()
  r_start = r_last = int(state.round)
  totals = {'num_nonfinite_clients': 0.0, 'num_dropped': 0.0}
  for r in range(int(state.round), config.num_rounds):
    sample_key, gather_key, apply_key = jax.random.split(
        jax.random.fold_in(round_key, r), 3)
    ids = cohort_lib.sample_clients(sample_key, pool.sizes, config.cohort_size,
                                    weighted=config.get('weighted_sampling',
                                                        False))
    cohort = cohort_lib.gather_cohort(train_ds, ids,
                                      config.max_examples_per_client,
                                      gather_key, pool)
    state, metrics = algorithm.apply(state, cohort, ids, apply_key)
    done = r + 1
    metrics = {k: float(v) for k, v in metrics.items()}
    if done == r_start + 1:
      logging.info('round %d/%d done in %.0f s (compilation included).',
                   done, config.num_rounds, time.time() - t0)
    for key in totals:
      totals[key] += metrics.get(key, 0.0)
    if metrics.get('num_nonfinite_clients', 0):
      logging.warning('Round %d: excluded %d clients with non-finite '
                      'updates.', done, metrics['num_nonfinite_clients'])
    record = {'round': done,
              'train_loss': metrics['train_loss'],
              'train_accuracy': metrics['train_accuracy'],
              'bytes_per_client': metrics.get('transform/bytes_sent',
                                              bytes_float32),
              'num_aggregated': metrics['num_aggregated'],
              'num_nonfinite_clients': metrics.get('num_nonfinite_clients', 0)}
    if done % config.eval_every == 0 or done == config.num_rounds:
      test = train.evaluate(eval_fn, state.params, state.model_state,
                            test_ds.x, test_ds.y, eval_batch)
      record.update(test_loss=test['loss'], test_accuracy=test['accuracy'])
      # Rounds since the last report (fewer after a resume or at the end);
      # the first report also pays for compilation.
      rate = (done - r_last) / max(time.time() - t_last, 1e-9)
      t_last, r_last = time.time(), done
      logging.info(
          'round %d/%d  train loss %.4f  test acc %.4f  %.0f bytes/client  '
          '(%.2f rounds/s, ETA %.0f s)', done, config.num_rounds,
          record['train_loss'], test['accuracy'], record['bytes_per_client'],
          rate, (config.num_rounds - done) / max(rate, 1e-9))
    # Wall seconds since this process started its rounds (restarts at 0
    # after a resume; includes compilation and evaluation).
    record['elapsed_seconds'] = time.time() - t0
    writer.write(done, record)
    if (done % config.checkpoint_every == 0 or done == config.num_rounds or
        done == stop_after_rounds):
      ckpt.save(done, {'server': state})
    if done == stop_after_rounds:
      writer.close()
      ckpt.close()
      return {'metrics': {'stopped_at': done}, 'state': state}

  final = train.evaluate(eval_fn, state.params, state.model_state, test_ds.x,
                         test_ds.y, eval_batch)
  results = {'test_accuracy': final['accuracy'], 'test_loss': final['loss'],
             'rounds': config.num_rounds, 'algorithm': config.algorithm,
             'cohort_size': config.cohort_size,
             'num_train_clients': pool.num_clients,
             'bytes_per_client_float32': bytes_float32,
             'num_params': num_params,
             'nonfinite_clients_skipped': totals['num_nonfinite_clients'],
             'clients_dropped': totals['num_dropped'],
             'train_seconds': time.time() - t0}
  records = metric_writer.read_metrics(writer.path)
  accs = [(rec['round'], rec['test_accuracy']) for rec in records
          if 'test_accuracy' in rec]
  if accs:
    results['best_test_accuracy'] = max(a for _, a in accs)
  if dp is not None and dp.enabled:
    results['dp_epsilon'] = privacy.compute_epsilon(
        dp.noise_multiplier, config.cohort_size / pool.num_clients,
        config.num_rounds, dp.delta)
    results['dp_delta'] = dp.delta
  with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
    json.dump(results, f, indent=2)
  metric_writer.plot_curves(
      records, os.path.join(workdir, 'accuracy_vs_round.png'),
      [('loss', ['train_loss', 'test_loss']),
       ('accuracy', ['train_accuracy', 'test_accuracy'])],
      title=f'{config.algorithm} {config.model} on {config.data.name}',
      x_key='round')
  writer.close()
  ckpt.close()
  print(metric_writer.markdown_table(
      [{'metric': k, 'value': v} for k, v in results.items()]))
  return {'metrics': results, 'state': state}
