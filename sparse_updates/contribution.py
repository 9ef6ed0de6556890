"""Contribution analysis and budgeted sparse updates (Lin et al., 2022).

Lin, Zhu, Chen, Wang, Gan & Han (2022), "On-Device Training Under 256KB
Memory", Section 3.2: starting from a pre-trained model, fine-tune the
classifier together with one candidate unit (a layer's biases, or a layer's
weights) at a time, and record the accuracy gain over fine-tuning the
classifier alone on a held-out split. Then choose the units that maximise
the summed gain under a memory budget (`sparse_updates.search`).

Two tasks: personalising the same keywords to held-out speakers
(`config.transfer_words = ()`), or, as TinyTL and Lin et al. evaluate
transfer, learning *new* keywords: the words in `config.transfer_words` are
held out of pre-training and learnt on the held-out speakers with a freshly
initialised classifier (`keyword_transfer_split`, `new_head`). Only the
second leaves the frozen features something to learn.

The study itself (pre-training, search, comparison) is
`sparse_updates.experiment.run`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ondevice import batching
from ondevice import models
from ondevice import optim
from ondevice import train
from ondevice.data.base import ArrayDataset
from sparse_updates import channel_masks
from sparse_updates import presets
from sparse_updates import rules as rules_lib
from sparse_updates import search


def split_adaptation(ds: ArrayDataset, adapt_fraction: float,
                     val_fraction: float, seed: int
                     ) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
  """Splits every client's examples into adaptation / validation / test."""
  if not (0 < adapt_fraction and 0 < val_fraction and
          adapt_fraction + val_fraction < 1):
    raise ValueError(
        f'adapt_fraction={adapt_fraction} and val_fraction={val_fraction} '
        'must be positive and sum to less than 1 (the rest is test).')
  rng = np.random.default_rng(seed)
  parts = ([], [], [])
  for client in ds.clients():
    idx = rng.permutation(np.flatnonzero(ds.client_id == client))
    a = int(round(adapt_fraction * len(idx)))
    v = int(round((adapt_fraction + val_fraction) * len(idx)))
    for part, chunk in zip(parts, (idx[:a], idx[a:v], idx[v:])):
      part.append(chunk)
  out = tuple(ds.take(np.sort(np.concatenate(p))) for p in parts)
  for name, part in zip(('adaptation', 'validation', 'test'), out):
    if not len(part):
      raise ValueError(f'The {name} split is empty; use more held-out data '
                       'or change adapt_fraction / val_fraction.')
  return out


def keyword_transfer_split(train_ds: ArrayDataset, held_out: ArrayDataset,
                           words: Sequence[str]
                           ) -> tuple[ArrayDataset, ArrayDataset,
                                      ArrayDataset]:
  """Splits the classes into pre-training words and new transfer words.

  Returns (pre-train, pre-train test, transfer): the training speakers'
  clips of the other words; the held-out speakers' clips of the other words
  (to evaluate pre-training); the held-out speakers' clips of `words`,
  relabelled 0..len(words)-1 in the order given.
  """
  words = tuple(words)
  unknown = sorted(set(words) - set(train_ds.class_names))
  if unknown or len(set(words)) != len(words):
    raise ValueError(f'config.transfer_words must be distinct class names of '
                     f'the dataset; unknown {unknown} in {words}. Classes: '
                     f'{train_ds.class_names}.')
  keep = tuple(w for w in train_ds.class_names if w not in words)
  if len(keep) < 2 or len(words) < 2:
    raise ValueError(f'Transfer needs >= 2 pre-training and >= 2 transfer '
                     f'words; got {len(keep)} and {len(words)}.')

  def relabel(ds: ArrayDataset, names: tuple[str, ...]) -> ArrayDataset:
    old = np.array([ds.class_names.index(n) for n in names])
    lookup = np.full(ds.num_classes, -1, np.int64)
    lookup[old] = np.arange(len(names))
    part = ds.take(np.flatnonzero(lookup[ds.y] >= 0))
    return dataclasses.replace(part, y=lookup[part.y].astype(np.int32),
                               class_names=names)

  return (relabel(train_ds, keep), relabel(held_out, keep),
          relabel(held_out, words))


def new_head(model: nn.Module, params, num_classes: int, example_x,
             key: jax.Array, model_name: str, norm: str,
             model_kwargs) -> tuple[nn.Module, Any]:
  """The pre-trained body with a fresh `num_classes` classifier.

  Every parameter outside the classifier keeps its pre-trained value (and
  the pre-trained tree's order, which layer-wise schemes read); the
  classifier gets the model's own initialisation drawn with `key`.
  """
  del model  # The new model differs only in its output width.
  new_model = models.build_model(model_name, num_classes, norm=norm,
                                 **dict(model_kwargs))
  fresh = train.flatten_params(
      new_model.init(key, example_x, train=False)['params'])
  flat = train.flatten_params(params)
  if set(fresh) != set(flat):
    raise ValueError('The model with a new head has different parameters: '
                     f'{sorted(set(fresh) ^ set(flat))}.')
  head = re.compile(presets.HEAD)
  out = {path: (fresh[path] if head.fullmatch(path) else leaf)
         for path, leaf in flat.items()}
  return new_model, train.unflatten_params(out)


class FineTuner:
  """Fine-tunes one model under many schemes, two equivalent ways.

  partitioned=True compiles the real sparse step for each scheme
  (`ondevice.train.make_train_step` over the trainable leaves, with
  `channel_masks.masked_optimizer` for partial channels): each step costs
  only what the scheme needs, but every scheme compiles once.
  partitioned=False compiles one step for all schemes: every leaf is
  differentiated and the scheme is a runtime 0/1 mask on the gradient
  (before the optimiser) and on the update (after it). Both follow the same
  trajectory (tests/test_sparse_contribution.py checks it); the second is
  faster for small models and short runs, where compilation dominates.
  Memory is accounted analytically either way: the analysis runs offline,
  as in Lin et al. (2022).
  """

  def __init__(self, model, cfg: ml_collections.ConfigDict,
               partitioned: bool | None = None):
    self.cfg = cfg
    self.partitioned = (cfg.get('partitioned', True) if partitioned is None
                        else partitioned)
    self.optimizer = optim.build_optimizer(cfg)
    self._loss_fn = train.classification_loss(model)
    loss_fn, optimizer = self._loss_fn, self.optimizer

    def step(params, opt_state, model_state, masks, batch, rng):
      (_, (_, new_model_state)), grads = jax.value_and_grad(
          lambda p: loss_fn(p, model_state, batch, rng), has_aux=True)(params)
      grads = jax.tree.map(jnp.multiply, grads, masks)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      updates = jax.tree.map(jnp.multiply, updates, masks)
      return optax.apply_updates(params, updates), opt_state, new_model_state

    self._step = jax.jit(step)
    self._init = jax.jit(optimizer.init)
    self._compiled = {}
    self._eval = jax.jit(train.make_eval_step(model))

  def masks(self, params, scheme: rules_lib.Rules,
            mask_key: jax.Array | None = None):
    """0/1 float masks shaped like params: what `scheme` lets train."""
    values = rules_lib.assign(params, scheme)
    channels = {}
    if rules_lib.channel_fractions(params, scheme):
      channels = channel_masks.update_masks(
          params, scheme, method=self.cfg.get('mask_method', 'magnitude'),
          key=mask_key)
    flat = train.flatten_params(params)
    out = {}
    for path, leaf in flat.items():
      # NumPy, not jnp: host-side constants need no compilation per shape.
      if path in channels:
        mask = np.broadcast_to(np.asarray(channels[path]), leaf.shape)
      else:
        mask = np.full(leaf.shape, values[path] is not None)
      out[path] = mask.astype(leaf.dtype)
    return train.unflatten_params(out)

  def _batches(self, data: ArrayDataset, seed: int):
    """(step, batch) pairs: a fresh permutation of `data` every epoch."""
    batches = batching.EpochBatches(seed, len(data),
                                    min(int(self.cfg.batch_size), len(data)))
    for i in range(int(self.cfg.num_steps)):
      yield i, batches.batch(i, data.x, data.y)

  def finetune(self, params, model_state, scheme: rules_lib.Rules,
               data: ArrayDataset, seed: int,
               mask_key: jax.Array | None = None):
    """Trains what `scheme` selects on `data`; returns (params, state)."""
    paths = rules_lib.trainable_paths(params, scheme)  # Raises if invalid.
    step_key = jax.random.key(seed)
    if self.partitioned:
      fractions = rules_lib.channel_fractions(params, scheme)
      key = (paths, tuple(sorted(fractions.items())))
      if key not in self._compiled:  # Schemes recur (e.g. the baseline).
        optimizer = self.optimizer
        if fractions:
          optimizer = channel_masks.masked_optimizer(
              optimizer, channel_masks.update_masks(
                  params, scheme, self.cfg.get('mask_method', 'magnitude'),
                  mask_key))
        self._compiled[key] = (optimizer, jax.jit(train.make_train_step(
            self._loss_fn, optimizer, paths)))
      optimizer, step = self._compiled[key]
      state = train.state_from_params(params, model_state, optimizer, paths)
      for i, batch in self._batches(data, seed):
        state, _ = step(state, batch, jax.random.fold_in(step_key, i))
      return state.params, state.model_state
    masks = self.masks(params, scheme, mask_key)
    opt_state = self._init(params)
    for i, batch in self._batches(data, seed):
      params, opt_state, model_state = self._step(
          params, opt_state, model_state, masks, batch,
          jax.random.fold_in(step_key, i))
    return params, model_state

  @staticmethod
  def is_finite(params) -> bool:
    """Whether fine-tuning kept every parameter finite (it may diverge)."""
    return all(bool(np.all(np.isfinite(np.asarray(x))))
               for x in jax.tree.leaves(params))

  def accuracy(self, params, model_state, data: ArrayDataset,
               batch_size: int = 256) -> float:
    return train.evaluate(self._eval, params, model_state, data.x, data.y,
                          min(batch_size, len(data)))['accuracy']


def measure_contributions(tuner: FineTuner, params, model_state,
                          units: list[search.Unit], adapt: ArrayDataset,
                          val: ArrayDataset, seed: int) -> dict[str, Any]:
  """Accuracy gain of each unit over classifier-only fine-tuning."""
  def score(scheme):
    p, s = tuner.finetune(params, model_state, scheme, adapt, seed,
                          jax.random.key(seed))
    if not tuner.is_finite(p):
      raise FloatingPointError(
          f'Fine-tuning {scheme} diverged (non-finite parameters) at '
          f'learning rate {tuner.cfg.learning_rate}; lower '
          'config.finetune.learning_rate.')
    return tuner.accuracy(p, s, val)

  baseline = score(search.scheme_rules([]))
  accs = {}
  for unit in units:
    accs[unit.name] = score(search.scheme_rules([unit]))
    logging.info('unit %-16s val accuracy %.4f (gain %+.4f)', unit.name,
                 accs[unit.name], accs[unit.name] - baseline)
  return {'baseline_accuracy': baseline, 'accuracy': accs,
          'gains': {k: v - baseline for k, v in accs.items()}}
