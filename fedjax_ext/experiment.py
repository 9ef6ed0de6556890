"""The federated run: `run(config, workdir)`, the only thing its binary calls.

    python -m experiments.federated --config=configs/fed_kws.py:smoke \
        --workdir=/tmp/fed

Steps, in order: check the whole config (`validate_config`, before any data
loads or anything compiles), resolve the quant mode, load and partition the
clients, build the model and the algorithm (`training.build_algorithm`), run
the rounds with `ondevice.loop.run_loop` (resume, per-round metrics,
evaluation, checkpoints), and write the final metrics and curves
(`report.write`).

Clients come from `config.data` (the registry's datasets, FedJAX files, or
a client store on disk read one cohort at a time: `store_clients`); with
`config.distributed` set, the rounds run over several processes joined by
`jax.distributed`, and process 0 alone evaluates and writes
(`fedjax_ext.distributed`).

metrics.jsonl has one row per round: train_loss, train_accuracy,
bytes_per_client, num_aggregated, num_nonfinite_clients, num_dropped and
update_norm (the L2 norm of the aggregate client update, noise included,
that the server optimiser receives), with test_loss and test_accuracy every
`eval_every` rounds, and under DP the round's clip norm (dp_clip_norm), the
update noise std (dp_noise_std), the noised fraction of the cohort whose
update was under the clip (dp_unclipped_fraction: the released count of
adaptive clipping, which tells whether the clip norm suits the updates) and
the epsilon spent so far (dp_epsilon; left out when the noise multiplier is 0, where no
finite epsilon exists, and null in final_metrics.json). The skipped and
dropped client counts are loop counters, checkpointed with the server state,
so a resumed run writes the same files as an uninterrupted one except for the
wall-clock fields (`ondevice.loop.WALL_CLOCK_KEYS`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from fedjax_ext import algorithms
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import distributed
from fedjax_ext import execution
from fedjax_ext import fedjax_interop
from fedjax_ext import federated_loop
from fedjax_ext import personalization
from fedjax_ext import privacy
from fedjax_ext import report
from fedjax_ext import store_clients
from fedjax_ext import training
from ondevice import init_from
from ondevice import loop
from ondevice import models
from ondevice import options
from ondevice import train
from ondevice.data import client_store
from ondevice.data import registry
from ondevice.data.base import ArrayDataset
import quantized_training

OPTIONAL_KEYS = ('partition', 'norm', 'model_kwargs', 'quant', 'trainable',
                 'client_momentum', 'weighted_sampling', 'dropout_rate',
                 'execution', 'host_threads', 'aggregator', 'compression', 'dp',
                 'secure_aggregation', 'personalize', 'init',
                 'eval_batch_size', 'distributed')
# Round metric -> its column in metrics.jsonl.
_LOGGED = {'train_loss': 'train_loss', 'train_accuracy': 'train_accuracy',
           'num_aggregated': 'num_aggregated',
           'num_nonfinite_clients': 'num_nonfinite_clients',
           'num_dropped': 'num_dropped',
           'aggregator/dp_clip_norm': 'dp_clip_norm',
           'aggregator/dp_noise_std': 'dp_noise_std',
           'aggregator/dp_unclipped_fraction': 'dp_unclipped_fraction',
           'update_norm': 'update_norm'}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config, before any data loads or anything compiles.

  Raises:
    ValueError: naming the config key, the bad value and the fix.
  """
  unknown = sorted(set(config) - set(training.REQUIRED_KEYS) -
                   set(OPTIONAL_KEYS))
  if unknown:
    raise ValueError(f'The config has unknown keys {unknown}; the federated '
                     f'run reads {sorted(training.REQUIRED_KEYS)} and '
                     f'{sorted(OPTIONAL_KEYS)}.')
  training.validate_config(config)
  if 'quant' in config:
    options.one_of(config, 'quant', quantized_training.QUANT_NAMES)
  if config.data.get('name', None) == FEDJAX_SQLITE:
    _validate_fedjax_data(config.data)
  elif store_clients.is_store(config.data):
    store_clients.validate(config)
  else:
    registry.validate_data_config(config.data)
  personalization.validate(config)
  init_from.validate(config)


# `config.data.name` of a FedJAX federated dataset on disk
# (`fedjax.SQLiteFederatedData`, e.g. written by FedJAX's
# SQLiteFederatedDataBuilder): a train and a test file, each client a
# natural client of the run.
FEDJAX_SQLITE = 'fedjax_sqlite'
_FEDJAX_FIELDS = ('name', 'train_path', 'test_path', 'x_key', 'y_key',
                  'num_classes')


def _validate_fedjax_data(data) -> None:
  unknown = sorted(set(data) - set(_FEDJAX_FIELDS))
  if unknown:
    raise ValueError(f'config.data has fields {unknown} that '
                     f"name='{FEDJAX_SQLITE}' does not read; it reads "
                     f'{list(_FEDJAX_FIELDS)}.')
  for key in ('train_path', 'test_path'):
    path = data.get(key, '')
    if not path or not os.path.isfile(path):
      raise ValueError(f'config.data.{key}={path!r} is not a file; give a '
                       'fedjax.SQLiteFederatedData file.')
  if data.get('num_classes', 0) < 0:
    raise ValueError('config.data.num_classes must be >= 0 (0: the largest '
                     f'label + 1); got {data.num_classes}.')


def load_data(data) -> tuple[ArrayDataset, ArrayDataset]:
  """(train, test) of `config.data`: the registry's, or FedJAX's files."""
  if data.get('name', None) != FEDJAX_SQLITE:
    return registry.load_dataset(data)
  fedjax = fedjax_interop.import_fedjax()
  sources = [fedjax_interop.FederatedDataSource(
      fedjax.SQLiteFederatedData.new(data[key]), data.get('x_key', 'x'),
      data.get('y_key', 'y')) for key in ('train_path', 'test_path')]
  num_classes = data.get('num_classes', 0) or None
  if num_classes is None:  # Both splits must agree on the label range.
    num_classes = 1 + max(int(np.max(s.to_array_dataset().y))
                          for s in sources)
  return tuple(s.to_array_dataset(num_classes) for s in sources)


class Parts(NamedTuple):
  """What the rounds need, built from the config and the data."""
  model: Any
  algorithm: algorithms.FederatedAlgorithm
  state: Any            # The initial server state.
  round_key: jax.Array
  num_params: int
  bytes_float32: int    # One client's trainable leaves as float32.
  trainable: Any = None  # What clients (and personalising users) train.


def run(config: ml_collections.ConfigDict, workdir: str, *,
        datasets: tuple[ArrayDataset, ArrayDataset] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        trainable: Sequence[str] | Callable[[str], bool] | None = None,
        stop_after_rounds: int | None = None) -> dict[str, Any]:
  """Runs `config.num_rounds` federated rounds and evaluates the server model.

  Args:
    config: see configs/fed_kws.py.
    workdir: metrics.jsonl, TensorBoard, checkpoints, accuracy_vs_round.png,
      final_metrics.json. A checkpoint there is resumed.
    datasets: (train, test) instead of loading `config.data`.
    model_kwargs: extra `models.build_model` arguments (they override the
      quant mode's).
    trainable: which params clients train and send, instead of
      `config.trainable`.
    stop_after_rounds: stop (checkpointed) after this round, as a preempted
      job would; rerunning resumes.

  Returns:
    {'metrics': final metrics (or {'stopped_at': round}), 'state': server
    state}.
  """
  validate_config(config)
  distributed.initialize_from_config(config)  # Before JAX sees a device.
  quant = quantized_training.get_quant(config.get('quant', 'none'))
  kwargs = {**quant.model_kwargs(), **dict(model_kwargs or {})}
  train_ds, test_ds, pool = load_clients(config, datasets)
  # A store's training clients stay on disk; the held-out ones show shapes.
  example = test_ds if isinstance(train_ds, client_store.ClientStore) else (
      train_ds)
  parts = build_parts(config, example, pool, kwargs, trainable)
  result = run_rounds(config, workdir, parts, train_ds, test_ds, pool,
                      stop_after_rounds)
  if result.stopped_early:
    return {'metrics': {'stopped_at': stop_after_rounds},
            'state': result.state}
  if not distributed.is_primary():  # Process 0 evaluates and writes.
    return {'metrics': {'rounds': config.num_rounds,
                        'process_index': jax.process_index()},
            'state': result.state}
  results = final_metrics(config, parts, pool, result)
  title = (f'{training.selected(config, "algorithm", algorithms.ALGORITHMS)[0]}'
           f' {config.model} on {config.data.name}')
  print(report.write(workdir, results, result.records, title))
  return {'metrics': results, 'state': result.state}


def load_clients(config, datasets=None
                 ) -> tuple[ArrayDataset, ArrayDataset, cohort_lib.ClientPool]:
  """(train, test, client pool): the config's data, partitioned if needed.

  From a client store (and no `datasets`), train and pool are one view of
  the store's training clients, read per cohort; test is in memory.
  """
  if datasets is None and store_clients.is_store(config.data):
    train, test_ds = store_clients.load(config.data)
    logging.info('Client store %s: %d training clients (%d examples) on '
                 'disk, %d held-out test examples.', train.root,
                 train.num_clients, train.num_examples, len(test_ds))
    return train, test_ds, train
  train_ds, test_ds = datasets or load_data(config.data)
  train_ds, test_ds = training.partition_clients(config, train_ds, test_ds)
  pool = cohort_lib.ClientPool.from_dataset(train_ds)
  if config.cohort_size > pool.num_clients:
    raise ValueError(f'config.cohort_size={config.cohort_size} exceeds the '
                     f'{pool.num_clients} training clients with data.')
  logging.info('Federated data: %d clients (%d skipped as empty), %d train / '
               '%d test examples.', pool.num_clients, pool.num_empty,
               len(train_ds), len(test_ds))
  return train_ds, test_ds, pool


def _model_kwargs(config, extra: Mapping[str, Any]) -> dict[str, Any]:
  kwargs = dict(extra)
  kwargs.setdefault('norm', config.get('norm', None))
  for key, value in config.get('model_kwargs', {}).items():
    kwargs.setdefault(key, tuple(value) if isinstance(value, list) else value)
  return kwargs


def build_parts(config, train_ds: ArrayDataset, pool: cohort_lib.ClientPool,
                model_kwargs: Mapping[str, Any], trainable=None) -> Parts:
  """The model, the algorithm and the initial server state."""
  model = models.build_model(config.model, train_ds.num_classes,
                             **_model_kwargs(config, model_kwargs))
  init_key, round_key = jax.random.split(jax.random.key(config.seed))
  state0 = train.init_state(model, optax.sgd(1.0), train_ds.x[:1], init_key)
  if trainable is None:
    trainable = training.trainable_from_config(config, state0.params)
  algorithm = training.build_algorithm(
      config, train.classification_loss(model), pool.num_clients, trainable)
  flat = train.flatten_params(state0.params)
  paths = train.resolve_trainable(state0.params, trainable)
  params, model_state = init_from.maybe_load(config, state0.params,
                                             state0.model_state)
  parts = Parts(
      model=model, algorithm=algorithm, trainable=trainable,
      state=algorithm.init(params, model_state),
      round_key=round_key,
      num_params=sum(int(np.size(v)) for v in flat.values()),
      bytes_float32=sum(int(np.size(flat[p])) * 4 for p in paths))
  logging.info('Model %s: %d params, %d bytes trainable as float32; %d '
               'clients, cohort %d, %d rounds.', config.model,
               parts.num_params, parts.bytes_float32, pool.num_clients,
               config.cohort_size, config.num_rounds)
  return parts


def _epsilon_of_rounds(config, pool) -> Callable[[int], float] | None:
  """rounds -> epsilon under DP (None without DP)."""
  dp = training.dp_config(config)
  if dp is None:
    return None
  return privacy.epsilon_curve(dp.noise_multiplier, config.cohort_size,
                               pool.num_clients, config.dp.delta)


def logged_round_step(step, bytes_float32: int,
                      epsilon: Callable[[int], float] | None):
  """`step` with its metrics reduced to the logged columns (plus epsilon)."""

  def logged(state, r):
    state, metrics = step(state, r)
    out = {column: metrics[name] for name, column in _LOGGED.items()
           if name in metrics}
    out['bytes_per_client'] = metrics.get('transform/bytes_sent',
                                          float(bytes_float32))
    if epsilon is not None and np.isfinite(epsilon(r + 1)):
      out['dp_epsilon'] = epsilon(r + 1)
    return state, out

  return logged


def run_rounds(config, workdir: str, parts: Parts, train_ds, test_ds, pool,
               stop_after_rounds: int | None = None) -> loop.LoopResult:
  """The rounds, through the shared loop (resume, log, evaluate, save)."""
  step = logged_round_step(round_step(config, parts, train_ds, pool),
                           parts.bytes_float32,
                           _epsilon_of_rounds(config, pool))
  eval_step = jax.jit(train.make_eval_step(parts.model))
  batch = min(config.get('eval_batch_size', 512), len(test_ds))

  personal = None
  if config.get('personalize', None) is not None and config.personalize.enabled:
    personal = personalization.PersonalizedEval(
        parts.model, train.classification_loss(parts.model), test_ds,
        config.personalize, parts.trainable)
    logging.info('Personalised evaluation on %d held-out users, K=%d.',
                 personal.num_users, config.personalize.k_shot)

  def evaluate(state):
    test = train.evaluate(eval_step, state.params, state.model_state,
                          test_ds.x, test_ds.y, batch)
    out = {'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
    if personal is not None:
      out.update(personal(state.params, state.model_state))
    return out

  schedule = loop.Schedule(
      num_steps=config.num_rounds, log_every=1, eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every, stop_after=stop_after_rounds)
  with distributed.loop_workdir(workdir) as loop_dir:
    return loop.run_loop(
        parts.state, step, schedule, workdir=loop_dir, config=config,
        eval_fn=evaluate if distributed.is_primary() else None,
        counters=federated_loop.COUNTERS, unit='round')


def round_step(config, parts: Parts, train_ds,
               pool) -> federated_loop.RoundStep:
  """Round r: from memory, from a store, or from a store over processes."""
  if not isinstance(train_ds, client_store.ClientStore):
    return federated_loop.make_round_step(parts.algorithm, train_ds, pool,
                                          config, parts.round_key)
  if jax.process_count() == 1:
    return distributed.make_store_round_step(parts.algorithm, train_ds,
                                             config, parts.round_key)
  return distributed.host_round_step(distributed.make_store_round_step(
      parts.algorithm, train_ds, config, parts.round_key,
      distributed.global_mesh()))


def _dp_results(config, pool) -> dict[str, Any]:
  dp = training.dp_config(config)
  if dp is None:
    return {}
  return {'dp_epsilon': _epsilon_of_rounds(config, pool)(config.num_rounds),
          'dp_delta': config.dp.delta,
          'dp_noise_multiplier': dp.noise_multiplier,
          'dp_clip_norm': dp.clip_norm,
          'dp_accountant': 'rdp, cohorts sampled without replacement'}


def final_metrics(config, parts: Parts, pool, result: loop.LoopResult
                  ) -> dict[str, Any]:
  """final_metrics.json: the last evaluation, totals and the run's setup."""
  last = [r for r in result.records if 'test_accuracy' in r][-1]
  results = {
      'test_accuracy': last['test_accuracy'], 'test_loss': last['test_loss'],
      'best_test_accuracy': report.best_test_accuracy(result.records),
      'rounds': config.num_rounds,
      'algorithm': training.selected(config, 'algorithm',
                                     algorithms.ALGORITHMS)[0],
      'cohort_size': config.cohort_size,
      'num_train_clients': pool.num_clients,
      'bytes_per_client_float32': parts.bytes_float32,
      'num_params': parts.num_params,
      'nonfinite_clients_skipped': result.totals['num_nonfinite_clients'],
      'clients_dropped': result.totals['num_dropped'],
      'train_seconds': result.seconds,
  }
  results.update(_dp_results(config, pool))
  results.update({k: v for k, v in last.items()
                  if k.startswith(('personalized_', 'global_'))})
  choices = execution.resolved_choices()
  for name in ('execution', 'host_threads', 'local_loop', 'conv'):
    if name in choices:
      results[name] = choices[name]
  return results
