"""A federated run's parts from its config: checks, algorithm, round hooks.

Parts chosen by name are declared with `ondevice.options.named`: a `name` plus
one sub-config per choice holding that choice's keyword arguments, so every
option is settable on the command line of a locked config:

    --config.algorithm.name=fedprox --config.algorithm.fedprox.mu=0.01
    --config.aggregator.name=krum --config.aggregator.krum.num_byzantine=1 \
        --config.aggregator.krum.multi_k=3
    --config.compression.name=top_k --config.compression.top_k.fraction=0.05
    --config.trainable.name=last_k --config.trainable.last_k.k=3

`algorithm_options`, `aggregator_options`, `compression_options`,
`trainable_options` and `dp_options` build those sub-configs for a config
file; `validate_config` checks every federated key and combination before any
data loads; `build_algorithm` turns a checked config into an `(init, apply)`
pair. The run itself is `fedjax_ext.experiment.run`.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
import optax

from fedjax_ext import aggregators
from fedjax_ext import algorithms
from fedjax_ext import client as client_lib
from fedjax_ext import compression
from fedjax_ext import distributed
from fedjax_ext import execution
from fedjax_ext import meta_client
from fedjax_ext import privacy
from fedjax_ext import rounds as rounds_lib
from fedjax_ext import secure_aggregation
from fedjax_ext import secure_dp
from fedjax_ext import store_clients
from ondevice import models
from ondevice import options
from ondevice.data import partition
from ondevice.data.base import ArrayDataset
from sparse_updates import presets

REQUIRED_KEYS = ('data', 'model', 'algorithm', 'num_rounds', 'cohort_size',
                 'local', 'client_learning_rate', 'server_learning_rate',
                 'max_examples_per_client', 'seed', 'eval_every',
                 'checkpoint_every')

# sparse_updates presets by name -> their rules builder (for the sub-configs;
# `presets.resolve` applies them). Clients send whole leaves, so presets that
# train part of a leaf's channels are rejected by `validate_config`.
TRAINABLE_PRESETS = presets.PRESET_BUILDERS
_PARTIAL_CHANNEL_PRESETS = ('sparse_channels',)
# The federated run builds plain models; lite residual branches need a
# `LiteResidualModel`, which only the sparse_updates study wraps.
_UNSUPPORTED_PRESETS = {'lite_residual': (
    'needs a model wrapped in sparse_updates.LiteResidualModel, and the '
    'federated run builds plain models')}
PARTITIONS = ('natural', 'dirichlet', 'iid')


def algorithm_options(default: str, **overrides) -> ml_collections.ConfigDict:
  """`{name: default, <algorithm>: {its hyperparameters}}` for a config."""
  values = {'fedprox': {'mu': 0.01}}
  values.update(overrides)
  return options.named(algorithms.ALGORITHMS, default, overrides=values,
                       skip=algorithms.RUN_ARGUMENTS)


def aggregator_options(default: str = 'mean', **overrides
                       ) -> ml_collections.ConfigDict:
  """The aggregator choice; krum with multi_k > 1 is multi-Krum."""
  values = {'trimmed_mean': {'trim_fraction': 0.1},
            'krum': {'num_byzantine': 1}}
  values.update(overrides)
  return options.named(aggregators.AGGREGATORS, default, overrides=values)


def compression_options(default: str = 'none', **overrides
                        ) -> ml_collections.ConfigDict:
  """The per-client compression: none, quantize (bits) or top_k (fraction)."""
  values = {'top_k': {'fraction': 0.1}}
  values.update(overrides)
  return options.named(compression.COMPRESSORS, default, overrides=values)


def trainable_options(default: str = 'full', **overrides
                      ) -> ml_collections.ConfigDict:
  """The sparse_updates preset clients train and send, with its arguments."""
  return options.named(TRAINABLE_PRESETS, default, overrides=overrides,
                       skip=('params', 'layer_order'))


def dp_options(**overrides) -> ml_collections.ConfigDict:
  """DP-FedAvg settings (see `privacy.DPConfig`); off by default.

  `clipped_count_stddev` unset means cohort_size / 20 (Andrew et al.).
  """
  values = dict(enabled=False, noise_multiplier=1.0, clip_norm=1.0,
                adaptive=False, target_quantile=0.5, clip_learning_rate=0.2,
                clipped_count_stddev=ml_collections.config_dict.placeholder(
                    float), delta=1e-5)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def secure_aggregation_options(**overrides) -> ml_collections.ConfigDict:
  """Secure aggregation (Bonawitz et al. 2017); off by default.

  With DP on, clients clip and noise before masking (`secure_dp`); without,
  each sends its weighted update, with coordinates clamped to
  `coordinate_bound`, which sets the fixed-point range.
  `late_dropout_rate` simulates clients that drop after masking (their
  masks are removed as the protocol's server does).
  """
  values = dict(enabled=False, coordinate_bound=1.0, late_dropout_rate=0.0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _enabled(config, section: str) -> bool:
  """Whether `config.<section>.enabled` is set (an absent section is off)."""
  cfg = config.get(section, None)
  return cfg is not None and bool(cfg.get('enabled', False))


def _secagg_enabled(config) -> bool:
  return _enabled(config, 'secure_aggregation')


def _check_secure_aggregation(config) -> None:
  if not _secagg_enabled(config):
    return
  options.positive(config, 'secure_aggregation.coordinate_bound')
  options.in_range(config, 'secure_aggregation.late_dropout_rate', 0.0, 1.0,
                   high_inclusive=False)
  if config.cohort_size < 2:
    raise ValueError('config.secure_aggregation.enabled needs '
                     'config.cohort_size >= 2: a masked sum of one client is '
                     f'that client\'s update; got {config.cohort_size}.')
  _require_mean(config, 'config.secure_aggregation.enabled: the server sees '
                'only the sum of the updates, so only the mean can be '
                'computed', "set config.aggregator.name='mean'")
  if config.get('norm', None) == 'batch' and not _dp_enabled(config):
    raise ValueError(
        "config.norm='batch' with config.secure_aggregation.enabled and no "
        'DP: batch statistics would have to travel through the masked sum '
        'clamped to coordinate_bound; use config.norm=\'group\' (or enable '
        'config.dp, which clips them with the update).')
  if config.get('execution', 'auto') == 'streamed':
    raise ValueError("config.execution='streamed' with "
                     'config.secure_aggregation.enabled: masks cancel only '
                     'in the sum of every client at once; use execution '
                     'vmap, chunked or auto.')


def _secure_aggregator(config, dp: privacy.DPConfig | None):
  """(aggregator, stateful aggregator) of secure aggregation."""
  cfg = config.secure_aggregation
  if dp is not None:
    return None, secure_dp.secure_dp_aggregator(
        dp, config.cohort_size, cfg.late_dropout_rate)
  # Clients send w_i * delta_i with w_i <= max_examples_per_client.
  scale = secure_aggregation.fixed_point_scale(
      cfg.coordinate_bound * config.max_examples_per_client,
      config.cohort_size)
  return secure_aggregation.secure_weighted_mean(
      scale, cfg.coordinate_bound, cfg.late_dropout_rate), None


def _as_named(config, key: str) -> ml_collections.ConfigDict:
  """config[key], which must be a name plus one sub-config per choice."""
  node = config[key]
  if not isinstance(node, (ml_collections.ConfigDict, dict)):
    raise ValueError(
        f'config.{key}={node!r} must be a name plus one sub-config of '
        f'arguments per choice, e.g. training.{key}_options({node!r}) in the '
        f'config file and --config.{key}.name=... on the command line.')
  return node


def selected(config, key: str, table: Mapping[str, Callable[..., Any]]
             ) -> tuple[str, Callable[..., Any], dict[str, Any]]:
  """(name, factory, kwargs) of the part `config.<key>` picks from `table`."""
  node = _as_named(config, key)
  factory, kwargs = options.selected(node, table, f'config.{key}')
  return node.name, factory, kwargs


def _chosen(config, key: str, default: str) -> ml_collections.ConfigDict:
  if config.get(key, None) is None:
    return ml_collections.ConfigDict({'name': default})
  return _as_named(config, key)


def trainable_choice(config) -> tuple[str, dict[str, Any]]:
  """(preset name, its keyword arguments) of `config.trainable`."""
  node = _chosen(config, 'trainable', 'full')
  _, kwargs = options.selected(node, TRAINABLE_PRESETS, 'config.trainable')
  return node.name, kwargs


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every federated key and combination; needs no data.

  Raises:
    ValueError: naming the config key, the bad value and the fix.
  """
  options.require(config, REQUIRED_KEYS)
  options.one_of(config, 'model', models.MODEL_NAMES)
  _check_numbers(config)
  _check_local(config)
  _check_algorithm(config)
  _check_aggregator(config)
  _check_compression(config)
  _check_trainable(config)
  _check_execution(config)
  _check_dp(config)
  _check_secure_aggregation(config)
  _check_partition(config)
  _check_distributed(config)


def _check_numbers(config) -> None:
  for key in ('num_rounds', 'cohort_size', 'max_examples_per_client',
              'eval_every', 'checkpoint_every'):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{key} must be an integer > 0; got {value!r}.')
  if isinstance(config.seed, bool) or not isinstance(config.seed, int):
    raise ValueError(f'config.seed must be an integer; got {config.seed!r}.')
  options.positive(config, 'client_learning_rate', 'server_learning_rate')
  if 'eval_batch_size' in config:
    options.positive(config, 'eval_batch_size')
  if 'client_momentum' in config:
    options.in_range(config, 'client_momentum', 0.0, 1.0,
                     high_inclusive=False)
  if 'dropout_rate' in config:
    options.in_range(config, 'dropout_rate', 0.0, 1.0, high_inclusive=False)
  if 'weighted_sampling' in config:
    options.booleans(config, 'weighted_sampling')


def _check_local(config) -> None:
  options.require(config, ('local.batch_size',))
  options.positive(config, 'local.batch_size')
  steps = config.local.get('num_steps', 0) or 0
  epochs = config.local.get('num_epochs', 0) or 0
  for key, value in (('num_steps', steps), ('num_epochs', epochs)):
    if value < 0:
      raise ValueError(f'config.local.{key} must be >= 0 (0: unused); got '
                       f'{value}.')
  if not steps and not epochs:
    raise ValueError('config.local.num_steps and config.local.num_epochs are '
                     'both 0; set at least one > 0.')
  for key, choices in (('loop', client_lib.LOOPS), ('conv', client_lib.CONVS),
                       ('last_batch', client_lib.LAST_BATCHES)):
    if key in config.local:
      options.one_of(config, f'local.{key}', choices)


# Hyperparameter -> (rule text, test) for the algorithms' own arguments.
_ALGORITHM_RANGES = {
    'mu': ('>= 0', lambda v: v >= 0),
    'momentum': ('in [0, 1)', lambda v: 0 <= v < 1),
    'b1': ('in [0, 1)', lambda v: 0 <= v < 1),
    'b2': ('in [0, 1)', lambda v: 0 <= v < 1),
    'tau': ('> 0', lambda v: v > 0),
    'alpha': ('> 0', lambda v: v > 0),
}


# Algorithms whose clients run few_shot's meta-learners, which refuse batch
# statistics (`few_shot.learner.require_stateless`).
_STATELESS_ALGORITHMS = ('per_fedavg', 'fed_reptile')


def _check_algorithm(config) -> None:
  name, _, kwargs = selected(config, 'algorithm', algorithms.ALGORITHMS)
  variant = kwargs.get('variant', meta_client.VARIANTS[0])
  if name == 'per_fedavg' and variant not in meta_client.VARIANTS:
    raise ValueError(f'config.algorithm.per_fedavg.variant={variant!r} is '
                     f'unknown; choose one of {meta_client.VARIANTS}.')
  for arg, value in kwargs.items():
    rule, ok = _ALGORITHM_RANGES.get(arg, (None, None))
    if ok is None:
      continue
    if not isinstance(value, (int, float)) or not math.isfinite(value) or (
        not ok(value)):
      raise ValueError(f'config.algorithm.{name}.{arg} must be {rule}; got '
                       f'{value!r}.')
  if name in _STATELESS_ALGORITHMS and config.get('norm', None) == 'batch':
    raise ValueError(
        f"config.norm='batch' with config.algorithm.name={name!r}: its "
        'clients meta-learn on small support sets, which needs a model '
        "without batch statistics; set config.norm='group', 'layer' or "
        "'none'.")
  if name == 'scaffold' and config.get('client_momentum', 0.0):
    raise ValueError(
        f'config.client_momentum={config.client_momentum} with '
        "config.algorithm.name='scaffold': SCAFFOLD's control variates "
        'assume plain local SGD; set config.client_momentum=0.0.')


def _build_checked(config, key: str, table) -> tuple[str, Any]:
  """Builds the part to run its factory's own checks, naming the key."""
  name, factory, kwargs = selected(config, key, table)
  try:
    return name, factory(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.{key}.{name} {kwargs}: {e}') from None


def _check_aggregator(config) -> None:
  name, _ = _build_checked(config, 'aggregator', aggregators.AGGREGATORS)
  if aggregators.AGGREGATORS[name] is not aggregators.krum:
    return
  krum = _as_named(config, 'aggregator')[name]
  f, k, c = krum.num_byzantine, krum.get('multi_k', 1), config.cohort_size
  if c < 2 * f + 3:
    raise ValueError(f'config.aggregator.{name}.num_byzantine={f} needs '
                     f'config.cohort_size >= 2f + 3 = {2 * f + 3}; got {c}. '
                     'Lower num_byzantine or raise cohort_size.')
  if k > c:
    raise ValueError(f'config.aggregator.{name}.multi_k={k} exceeds '
                     f'config.cohort_size={c}.')


def _check_compression(config) -> None:
  _build_checked(config, 'compression', compression.COMPRESSORS)


def _check_trainable(config) -> None:
  name, kwargs = trainable_choice(config)
  if name in _UNSUPPORTED_PRESETS:
    valid = sorted(set(TRAINABLE_PRESETS) - set(_UNSUPPORTED_PRESETS) -
                   set(_PARTIAL_CHANNEL_PRESETS))
    raise ValueError(f"config.trainable.name='{name}' "
                     f'{_UNSUPPORTED_PRESETS[name]}; choose one of {valid}.')
  fraction = kwargs.get('weight_fraction', 1.0)
  if name in _PARTIAL_CHANNEL_PRESETS or (name == 'tte' and fraction != 1.0):
    raise ValueError(
        f"config.trainable.name='{name}' trains part of a leaf's channels; "
        'federated clients send whole leaves, so use a whole-leaf scheme '
        '(bias_only, norm_only, classifier_only, last_k, tte with '
        'weight_fraction=1).')
  k = kwargs.get('k', 1)
  if name == 'last_k' and (not isinstance(k, int) or k < 1):
    raise ValueError(f'config.trainable.last_k.k must be an integer >= 1; '
                     f'got {k!r}.')


def _check_host_threads(config, strategy: str) -> None:
  threads = config.get('host_threads', 1)
  try:  # ExecutionConfig's own checks: an integer >= 1, not with 'sharded'.
    execution.ExecutionConfig(strategy, host_threads=threads)
  except ValueError as e:
    raise ValueError(f'config.host_threads={threads!r}: {e}') from e
  if threads == 1:
    return
  if distributed.is_multiprocess(config):
    raise ValueError(
        f'config.host_threads={threads} with config.distributed: the clients '
        'are already spread over the processes\' devices; set '
        'config.host_threads=1.')
  algorithm = _chosen(config, 'algorithm', 'fedavg').name
  if algorithm == 'scaffold':
    raise ValueError(
        f'config.host_threads={threads} with config.algorithm.name='
        "'scaffold': its control variates are updated inside one "
        'computation; set config.host_threads=1.')


def _check_execution(config) -> None:
  strategy = config.get('execution', 'auto')
  if strategy not in execution.STRATEGIES:
    raise ValueError(f'config.execution={strategy!r} is unknown; choose one '
                     f'of {execution.STRATEGIES}.')
  _check_host_threads(config, strategy)
  if strategy != 'streamed':
    return
  aggregator = _chosen(config, 'aggregator', 'mean').name
  if aggregators.AGGREGATORS[aggregator] is not aggregators.weighted_mean:
    raise ValueError(
        f"config.execution='streamed' sums client updates as they finish, "
        f'which only the mean can do; config.aggregator.name={aggregator!r} '
        'needs every update at once. Use execution vmap, chunked or auto.')
  if _dp_enabled(config):
    raise ValueError("config.execution='streamed' with config.dp.enabled: "
                     'DP clips every update before summing them all; use '
                     'execution vmap, chunked or auto.')


def _require_mean(config, why: str, fix: str) -> None:
  """Raises unless config.aggregator is the (weighted) mean."""
  aggregator = _chosen(config, 'aggregator', 'mean').name
  if aggregators.AGGREGATORS[aggregator] is not aggregators.weighted_mean:
    raise ValueError(f'config.aggregator.name={aggregator!r} with {why}; '
                     f'{fix}.')


def _dp_enabled(config) -> bool:
  return _enabled(config, 'dp')


def _check_dp(config) -> None:
  if not _dp_enabled(config):
    return
  options.in_range(config, 'dp.delta', 0.0, 1.0, low_inclusive=False,
                   high_inclusive=False)
  dp_config(config)  # Its own range checks, renamed to the config keys.
  algorithm = _as_named(config, 'algorithm').name
  if algorithm == 'scaffold':
    raise ValueError('config.dp.enabled with config.algorithm.name='
                     "'scaffold' is not supported: SCAFFOLD shares control "
                     'variates that DP-FedAvg does not clip.')
  _require_mean(config, 'config.dp.enabled: DP-FedAvg replaces the '
                'aggregator by its clipped, noised mean, and its privacy '
                'analysis does not cover a robust rule on top',
                "set config.aggregator.name='mean' or turn DP off")
  if config.get('weighted_sampling', False):
    raise ValueError(
        'config.weighted_sampling=True with config.dp.enabled: the privacy '
        'accountant assumes uniform cohorts drawn without replacement; set '
        'config.weighted_sampling=False.')


def dp_config(config) -> privacy.DPConfig | None:
  """`privacy.DPConfig` of `config.dp` (None when DP is off).

  Raises:
    ValueError: naming `config.dp.<field>` for a value DPConfig rejects.
  """
  if not _dp_enabled(config):
    return None
  dp = config.dp
  stddev = dp.get('clipped_count_stddev', None)
  try:
    return privacy.DPConfig(
        noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm,
        expected_num_clients=config.cohort_size, adaptive=dp.adaptive,
        target_quantile=dp.target_quantile,
        clip_learning_rate=dp.get('clip_learning_rate', 0.2),
        clipped_count_stddev=stddev)
  except ValueError as e:
    field = str(e).split('DPConfig.', 1)[-1].split(' ', 1)[0]
    fix = ''
    if field == 'clipped_count_stddev':
      need = 0.5 * dp.noise_multiplier
      fix = (f' Set config.dp.clipped_count_stddev above {need:g} (half of '
             'config.dp.noise_multiplier), or turn config.dp.adaptive off.')
    key = ('cohort_size' if field == 'expected_num_clients'
           else f'dp.{field}')
    raise ValueError(f'config.{key}: {e}{fix}') from None


def _check_partition(config) -> None:
  part = config.get('partition', None)
  if part is None:
    return
  options.one_of(config, 'partition.kind', PARTITIONS)
  if part.kind == 'natural':
    return
  options.positive(config, 'partition.num_clients')
  if part.num_clients < config.cohort_size:
    raise ValueError(f'config.partition.num_clients={part.num_clients} is '
                     f'below config.cohort_size={config.cohort_size}.')
  if part.kind == 'dirichlet':
    options.positive(config, 'partition.alpha')


_DISTRIBUTED_FIELDS = ('coordinator', 'num_processes', 'process_id',
                       'timeout_s')


def _check_distributed(config) -> None:
  """`config.distributed`: the processes, and what they need of the run."""
  dist = config.get('distributed', None)
  if dist is None:
    return
  unknown = sorted(set(dist) - set(_DISTRIBUTED_FIELDS))
  if unknown:
    raise ValueError(f'config.distributed has fields {unknown}; it reads '
                     f'{list(_DISTRIBUTED_FIELDS)}.')
  n, i = dist.get('num_processes', 1), dist.get('process_id', 0)
  if not dist.get('coordinator', ''):
    if (n, i) != (1, 0):
      raise ValueError(
          f'config.distributed.num_processes={n} (process_id={i}) without '
          "config.distributed.coordinator: set the coordinator's host:port, "
          'or num_processes=1 and process_id=0 for one process.')
    return
  try:
    distributed.parse_address(dist.coordinator)
  except ValueError as e:
    raise ValueError(f'config.distributed.coordinator: {e}') from None
  for key, value in (('num_processes', n), ('process_id', i)):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f'config.distributed.{key} must be an integer; got '
                       f'{value!r}.')
  if n < 1 or not 0 <= i < n:
    raise ValueError(f'config.distributed.process_id={i} must lie in [0, '
                     f'config.distributed.num_processes={n}), with n >= 1.')
  options.positive(config, 'distributed.timeout_s')
  _check_process_split(config, n)


def _check_process_split(config, num_processes: int) -> None:
  """What several processes need: a store, an even split, 'sharded'."""
  if config.cohort_size % num_processes:
    fit = -(-config.cohort_size // num_processes) * num_processes
    raise ValueError(
        f'config.cohort_size={config.cohort_size} does not divide over '
        f'config.distributed.num_processes={num_processes}; each process '
        f'trains an equal share, so choose a multiple (e.g. {fit}).')
  if not store_clients.is_store(config.data):
    raise ValueError(
        f'config.data.name={config.data.get("name", None)!r} with '
        'config.distributed.coordinator set: each process reads only its '
        f"own clients, which needs config.data.name='{store_clients.NAME}'.")
  strategy = config.get('execution', 'auto')
  if strategy not in ('auto', 'sharded'):
    raise ValueError(
        f'config.execution={strategy!r} with config.distributed.coordinator '
        "set: clients are split over every process's devices, which is "
        "the 'sharded' strategy; set config.execution='sharded' (or "
        "'auto').")


def partition_clients(config, train_ds: ArrayDataset, test_ds: ArrayDataset
                      ) -> tuple[ArrayDataset, ArrayDataset]:
  """Gives datasets without natural clients a Dirichlet or IID partition."""
  part = config.get('partition', None)
  if part is None or part.kind == 'natural':
    if np.all(train_ds.client_id < 0):
      raise ValueError(f'{config.data.name} has no natural clients; set '
                       "config.partition.kind='dirichlet' or 'iid'.")
    return train_ds, test_ds
  if part.kind == 'dirichlet':
    ids = partition.dirichlet_partition(train_ds.y, part.num_clients,
                                        part.alpha, part.seed)
  else:
    ids = partition.iid_partition(train_ds.y, part.num_clients, part.seed)
  return partition.assign_clients(train_ds, ids), test_ds


def rounds_config(config) -> rounds_lib.RoundConfig:
  """The round's hooks: compression, aggregator (or DP), faults, execution.

  With DP on, the DP-FedAvg aggregator takes the aggregator's place (only
  'mean' is accepted there), clients count equally, and each client's
  batch-norm statistics travel with its update through the clip and the
  noise, so no model state is averaged in the clear. Secure aggregation
  replaces the mean (or DP's mean) by its masked sum, model state included.
  """
  _, transform = _build_checked(config, 'compression', compression.COMPRESSORS)
  dp = dp_config(config)
  aggregator, stateful = None, None
  secure = _secagg_enabled(config)
  if secure:
    aggregator, stateful = _secure_aggregator(config, dp)
  elif dp is not None:
    stateful = privacy.dp_aggregator(dp)
  else:
    name, built = _build_checked(config, 'aggregator', aggregators.AGGREGATORS)
    if aggregators.AGGREGATORS[name] is not aggregators.weighted_mean:
      aggregator = built
    # else: the round's own weighted mean (None), which execution 'auto' can
    # stream client by client.
  return rounds_lib.RoundConfig(
      aggregator=aggregator, stateful_aggregator=stateful,
      transform=transform, dropout_rate=config.get('dropout_rate', 0.0),
      uniform_weights=dp is not None,
      private_model_state=dp is not None or secure,
      execution=_execution_config(config))


def _execution_config(config) -> execution.ExecutionConfig:
  """`config.execution`; over several processes, 'sharded' on all devices."""
  if distributed.is_multiprocess(config):
    return execution.ExecutionConfig('sharded', mesh=distributed.global_mesh())
  return execution.ExecutionConfig(
      strategy=config.get('execution', 'auto'),
      host_threads=config.get('host_threads', 1))


def trainable_from_config(config, params) -> tuple[str, ...] | None:
  """The paths clients train and send under `config.trainable`.

  A `sparse_updates` preset applied to `params` in `model.init` order;
  None means every leaf.
  """
  name, kwargs = trainable_choice(config)
  if name == 'full':
    return None
  try:
    scheme = presets.resolve(name, params, **kwargs)
  except ValueError as e:
    raise ValueError(f'config.trainable.{name}: {e}') from None
  if scheme.masks:
    raise ValueError(
        f'config.trainable.name={name!r} trains part of the channels of '
        f'{sorted(scheme.masks)}; federated clients send whole leaves, so '
        'use a whole-leaf scheme (bias_only, norm_only, classifier_only, '
        'last_k, tte with weight_fraction=1).')
  return scheme.paths


def local_config(config, trainable) -> client_lib.LocalConfig:
  """The clients' local work from `config.local`."""
  extra = {key: config.local[key] for key in ('loop', 'conv', 'last_batch')
           if key in config.local}
  return client_lib.LocalConfig(
      batch_size=config.local.batch_size,
      num_steps=config.local.get('num_steps', None) or None,
      num_epochs=config.local.get('num_epochs', None) or None,
      trainable=trainable, **extra)


def build_algorithm(config, loss_fn, num_train_clients: int,
                    trainable) -> algorithms.FederatedAlgorithm:
  """The `(init, apply)` pair named by `config.algorithm`.

  Every entry of `algorithms.ALGORITHMS` takes the same arguments; those in
  `algorithms.RUN_ARGUMENTS` come from the run, the rest from the
  algorithm's sub-config.
  """
  _, factory, kwargs = selected(config, 'algorithm', algorithms.ALGORITHMS)
  run_args = {'num_clients': num_train_clients,
              'local_learning_rate': config.client_learning_rate,
              'server_learning_rate': config.server_learning_rate,
              'rounds': rounds_config(config)}
  accepted = inspect.signature(factory).parameters
  kwargs.update({k: v for k, v in run_args.items() if k in accepted})
  client_opt = optax.sgd(config.client_learning_rate,
                         momentum=config.get('client_momentum', 0.0) or None)
  return factory(loss_fn, client_opt, local_config(config, trainable),
                 **kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       **kwargs) -> dict[str, Any]:
  """`fedjax_ext.experiment.run` (kept for callers of the old name)."""
  from fedjax_ext import experiment  # pylint: disable=g-import-not-at-top
  return experiment.run(config, workdir, **kwargs)
