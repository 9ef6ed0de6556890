"""The contribution study as one run: `run(config, workdir)`.

Lin, Zhu, Chen, Wang, Gan & Han (2022), "On-Device Training Under 256KB
Memory", Section 3.2. Pre-train (or resume) a global model, fold its batch
norm into the convolutions as a device would, split the held-out speakers'
data into adaptation / validation / test examples, measure every unit's
accuracy gain on validation (`contribution.measure_contributions`), search
the best scheme under each memory budget (`search.greedy_search`), and
compare the searched schemes with the named presets on test, each at its
best validation learning rate. Writes contribution.json, contribution.md and
contribution_gains.png (`report.write`).

Two tasks: personalising the same keywords to held-out speakers
(`config.transfer_words = ()`), or learning *new* keywords, as TinyTL and
Lin et al. evaluate transfer: the words in `config.transfer_words` are held
out of pre-training and learnt on the held-out speakers with a fresh
classifier (`contribution.keyword_transfer_split`, `contribution.new_head`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from central import pretrain as pretrain_lib
from central import supervised
from ondevice import cost
from ondevice import models
from ondevice import optim
from ondevice import options
from ondevice.data import registry
from ondevice.data.base import ArrayDataset
from sparse_updates import batchnorm_folding
from sparse_updates import channel_masks
from sparse_updates import contribution
from sparse_updates import presets
from sparse_updates import report
from sparse_updates import rules as rules_lib
from sparse_updates import search

_REQUIRED = ('data', 'model', 'seed', 'pretrain', 'finetune', 'search',
             'schemes', 'adapt_fraction', 'val_fraction', 'split_seed',
             'unit_weight_fraction', 'fold_batch_norm', 'last_k',
             'finetune.batch_size', 'finetune.num_steps',
             'finetune.learning_rate', 'finetune.optimizer',
             'search.budgets_kb', 'search.batch_size',
             'search.relu_mask_bits')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that needs no data, before anything loads."""
  options.require(config, _REQUIRED)
  unknown = sorted(set(config.schemes) - set(presets.PRESETS))
  if unknown:
    raise ValueError(f'config.schemes has unknown schemes {unknown}; choose '
                     f'from {presets.PRESETS}.')
  if not config.model in models.MODEL_NAMES:
    raise ValueError(f'config.model={config.model!r} is unknown; choose one '
                     f'of {models.MODEL_NAMES}.')
  options.positive(config, 'finetune.batch_size', 'finetune.num_steps',
                   'finetune.learning_rate', 'search.batch_size', 'last_k')
  options.in_range(config, 'unit_weight_fraction', 0, 1, low_inclusive=False)
  for key in ('adapt_fraction', 'val_fraction'):
    options.in_range(config, key, 0, 1, low_inclusive=False,
                     high_inclusive=False)
  if config.adapt_fraction + config.val_fraction >= 1:
    raise ValueError(
        f'config.adapt_fraction + config.val_fraction must be < 1 (the rest '
        f'is test); got {config.adapt_fraction} + {config.val_fraction}.')
  if not config.search.budgets_kb or any(
      not kb > 0 for kb in config.search.budgets_kb):
    raise ValueError('config.search.budgets_kb must be positive; got '
                     f'{config.search.budgets_kb}.')
  options.one_of(config, 'search.relu_mask_bits', (1, 8, 32))
  min_gain = config.search.get('min_gain', None)
  if min_gain is not None and min_gain < 0:
    raise ValueError(f'config.search.min_gain must be >= 0 or None; got '
                     f'{min_gain}.')
  cost.optimizer_slots(config.finetune.optimizer)
  optim.build_optimizer(config.finetune)
  grid = tuple(config.finetune.get('lr_grid', ()) or ())
  if any(not lr > 0 for lr in grid):
    raise ValueError('config.finetune.lr_grid must hold positive learning '
                     f'rates; got {grid}.')
  try:
    supervised.validate_config(pretrain_section(config))
  except ValueError as e:
    raise ValueError('Pre-training (config.pretrain with config.data, '
                     f'config.model and config.seed): {e}') from e


def pretrain_section(config) -> ml_collections.ConfigDict:
  """The supervised config of pre-training: config.pretrain + data, model."""
  section = ml_collections.ConfigDict(config.pretrain.to_dict())
  section.data = config.data
  section.model = config.model
  section.model_kwargs = config.get('model_kwargs', {})
  section.seed = config.seed
  return section


@dataclasses.dataclass(frozen=True)
class _Task:
  """Pre-training data, the held-out speakers' data, and the new words."""
  pretrain_data: tuple[ArrayDataset, ArrayDataset]
  held_out: ArrayDataset
  transfer_words: tuple[str, ...]


def _task(config, datasets) -> _Task:
  train_ds, held_out = datasets or registry.load_dataset(config.data)
  words = tuple(config.get('transfer_words', ()) or ())
  if not words:
    return _Task((train_ds, held_out), held_out, ())
  pretrain_train, pretrain_test, held_out = (
      contribution.keyword_transfer_split(train_ds, held_out, words))
  logging.info('Pre-training on %d words; transferring to %s.',
               pretrain_train.num_classes, words)
  return _Task((pretrain_train, pretrain_test), held_out, words)


def _norm(config) -> str:
  return config.pretrain.get('norm', 'batch')


def _folded(config) -> bool:
  return bool(config.fold_batch_norm) and _norm(config) == 'batch'


def pretrained_model(config, workdir: str, datasets) -> tuple[Any, Any, Any]:
  """Pre-trains (or resumes) and returns (model, params, model_state).

  With `config.fold_batch_norm`, a batch-norm model comes back folded: the
  form a device runs, with no batch statistics left.
  """
  out = pretrain_lib.pretrain(pretrain_section(config), workdir,
                              workdir=os.path.join(workdir, 'pretrain'),
                              datasets=tuple(datasets))
  num_classes = datasets[0].num_classes
  kwargs = dict(config.get('model_kwargs', {}))
  if _folded(config):
    params = batchnorm_folding.fold_batch_norm(
        out.params, out.model_state['batch_stats'])
    return (models.build_model(config.model, num_classes, norm='none',
                               **kwargs), params, {})
  model = models.build_model(config.model, num_classes, norm=_norm(config),
                             **kwargs)
  return model, out.params, dict(out.model_state)


def _schemes(config, params, order, searched: list[search.SearchResult]):
  """(label, rules) of every scheme compared on the test split."""
  out = []
  for name in config.schemes:
    if name == 'last_k':
      out.append((f'last_k (k={config.last_k})',
                  presets.get_rules('last_k', params, k=config.last_k,
                                    layer_order=order)))
    else:
      out.append((name, presets.get_rules(name, params)))
  for result in searched:
    label = f'searched @ {result.budget_bytes // 1024} KB'
    out.append((label, search.scheme_rules(result.units)))
  return out


@dataclasses.dataclass(frozen=True)
class _Study:
  """What every stage after pre-training shares."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  model_state: Any
  splits: tuple[ArrayDataset, ArrayDataset, ArrayDataset]  # adapt/val/test
  order: list[str]
  tuner: contribution.FineTuner
  batch_shape: tuple[int, ...]

  def memory_of(self, scheme) -> float:
    """Analytic training memory (bytes) of one on-device step of `scheme`."""
    return cost.analytic_training_memory(
        self.model, self.params, rules_lib.trainable_paths(self.params,
                                                           scheme),
        self.batch_shape, cost.optimizer_slots(self.config.finetune.optimizer),
        model_state=self.model_state,
        relu_mask_bits=self.config.search.relu_mask_bits).training


def _study(config, workdir, task: _Task, pretrained) -> _Study:
  """Loads or pre-trains the model, gives it its head, splits the data."""
  example_x = task.pretrain_data[0].x[:1]
  model, params, model_state = (
      pretrained or pretrained_model(config, workdir, task.pretrain_data))
  if task.transfer_words:
    model, params = contribution.new_head(
        model, params, task.held_out.num_classes, example_x,
        jax.random.fold_in(jax.random.key(config.seed), 1), config.model,
        'none' if _folded(config) else _norm(config),
        config.get('model_kwargs', {}))
  splits = contribution.split_adaptation(
      task.held_out, config.adapt_fraction, config.val_fraction,
      config.split_seed)
  logging.info('Adaptation %d / validation %d / test %d examples.',
               *map(len, splits))
  # Trained params come back from jit with sorted keys: take the layer order
  # from the forward pass instead.
  order = presets.forward_order(model, {'params': params, **model_state},
                                example_x)
  return _Study(config, model, params, model_state, splits, order,
                contribution.FineTuner(model, config.finetune),
                (config.search.batch_size,) + tuple(example_x.shape[1:]))


def _search(study: _Study, units, contrib) -> tuple[float, list]:
  """The minimum gain and the searched scheme under each budget."""
  config = study.config
  memory_fn = search.cached(
      lambda us: study.memory_of(search.scheme_rules(us)))
  min_gain = config.search.get('min_gain', None)
  if min_gain is None:
    # The binomial standard error of the baseline's validation accuracy.
    p = contrib['baseline_accuracy']
    min_gain = float(np.sqrt(p * (1 - p) / len(study.splits[1])))
  searched = [search.greedy_search(units, contrib['gains'], memory_fn,
                                   int(kb * 1024), min_gain)
              for kb in config.search.budgets_kb]
  return min_gain, searched


def _tuners(study: _Study) -> dict[float, contribution.FineTuner]:
  """A fine-tuner per learning rate of the validation grid."""
  finetune = study.config.finetune
  grid = tuple(finetune.get('lr_grid', ()) or (finetune.learning_rate,))
  return {lr: (study.tuner if lr == finetune.learning_rate else
               contribution.FineTuner(study.model, ml_collections.ConfigDict(
                   dict(finetune.to_dict(), learning_rate=lr))))
          for lr in grid}


def _compare(study: _Study, label: str, scheme, tuners) -> dict[str, Any]:
  """One scheme at its best validation learning rate, scored on test."""
  config, params = study.config, study.params
  adapt, val, test = study.splits
  best = None
  for lr, tuner in tuners.items():
    p, s = tuner.finetune(params, study.model_state, scheme, adapt,
                          config.seed, jax.random.key(config.seed))
    if not tuner.is_finite(p):  # A rate of the grid diverged: skip it.
      logging.warning('%s diverged at learning rate %g; skipped.', label, lr)
      continue
    val_acc = tuner.accuracy(p, s, val)
    if best is None or val_acc > best[0]:
      best = (val_acc, lr, p, s)
  if best is None:
    raise FloatingPointError(
        f'{label} diverged at every rate of config.finetune.lr_grid '
        f'{tuple(tuners)}; lower them.')
  val_acc, lr, p, s = best
  masks = None
  if rules_lib.channel_fractions(params, scheme):
    masks = channel_masks.update_masks(
        params, scheme, config.finetune.get('mask_method', 'magnitude'),
        jax.random.key(config.seed))
  return {'scheme': label,
          'test_accuracy': study.tuner.accuracy(p, s, test),
          'val_accuracy': val_acc, 'learning_rate': lr,
          'memory_kb': study.memory_of(scheme) / 1024,
          'upload_kb': cost.bytes_of_trainable(
              params, rules_lib.trainable_paths(params, scheme),
              masks) / 1024}


def _rows(study: _Study, task: _Task, searched) -> list[dict[str, Any]]:
  """The test-split comparison of every scheme."""
  rows = []
  if not task.transfer_words:  # A fresh head without training is chance.
    rows.append({'scheme': 'pre-trained (no update)',
                 'test_accuracy': study.tuner.accuracy(
                     study.params, study.model_state, study.splits[2]),
                 'memory_kb': 0.0, 'upload_kb': 0.0})
  # Each scheme at its best learning rate on validation: one rate for all
  # would favour the schemes it happens to suit (full updates need a
  # smaller one than a linear probe).
  tuners = _tuners(study)
  for label, scheme in _schemes(study.config, study.params, study.order,
                                searched):
    rows.append(_compare(study, label, scheme, tuners))
    logging.info('%s', rows[-1])
  return rows


def run(config: ml_collections.ConfigDict, workdir: str, *,
        datasets: tuple[ArrayDataset, ArrayDataset] | None = None,
        pretrained: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
  """Pre-train, contribution analysis, budgeted search, comparison.

  Args:
    config: see configs/contribution_kws.py.
    workdir: output directory (pre-training resumes from workdir/pretrain).
    datasets: (train, held-out) to use instead of loading `config.data`.
    pretrained: (model, params, model_state) to start from instead of
      pre-training on the train split.

  Returns:
    The results written to contribution.json.
  """
  t0 = time.time()
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  task = _task(config, datasets)
  study = _study(config, workdir, task, pretrained)
  units = search.contribution_units(study.params,
                                    config.unit_weight_fraction,
                                    layer_order=study.order)
  contrib = contribution.measure_contributions(
      study.tuner, study.params, study.model_state, units, study.splits[0],
      study.splits[1], config.seed)
  min_gain, searched = _search(study, units, contrib)
  rows = _rows(study, task, searched)
  results = {'task': ({'kind': 'new_keywords',
                       'transfer_words': list(task.transfer_words),
                       'pretrain_words': list(
                           task.pretrain_data[0].class_names)}
                      if task.transfer_words else {'kind': 'same_keywords'}),
             'units': [u.name for u in units],
             'unit_weight_fraction': config.unit_weight_fraction, **contrib,
             'min_gain': min_gain,
             'search': [r.to_json() for r in searched], 'schemes': rows,
             'memory_batch_shape': list(study.batch_shape),
             'relu_mask_bits': config.search.relu_mask_bits,
             'seconds': time.time() - t0}
  report.write(results, workdir)
  return results
