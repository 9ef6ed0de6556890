"""FedUV vs softmax baselines on speaker verification: `run(config, workdir)`.

Trains each variant named in `config.variants` (`variants.VARIANTS`) on the
same splits (`ondevice.data.verification`), scores the same trials
(`scoring`) and writes results.json, results.md, roc.png and
trials_<row>.npz to the work directory (`report`), rewritten after every
variant so a killed run keeps the finished ones. Each variant trains in
`<workdir>/variants/<name>/` (checkpoints and metrics.jsonl), so a rerun
resumes where the last one stopped.

Every key derives from `config.seed`; a variant's keys depend on its name
only, so its numbers do not depend on which others run in the same process.
The quantisation mode `config.quant` reaches every layer of both model kinds.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from fedjax_ext import codes
from fedjax_ext import verification
from fedjax_ext.feduv import report
from fedjax_ext.feduv import scoring
from fedjax_ext.feduv import trainers
from fedjax_ext.feduv import validation
from fedjax_ext.feduv import variants as variants_lib
from ondevice import train
from ondevice.data import verification as verification_data
import quantized_training

validate_config = validation.validate_config


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and scores every variant; returns the content of results.json."""
  names = validate_config(config)
  hooks = quantized_training.get_quant(config.quant).model_kwargs()
  os.makedirs(workdir, exist_ok=True)
  splits = verification_data.load_verification_splits(config)
  code_key, variant_key = jax.random.split(jax.random.key(config.seed))
  code = codes.bch_code(config.code.m, config.code.t)
  codewords = codes.user_codewords(code, np.arange(splits.num_users),
                                   splits.num_users, code_key,
                                   config.code.min_random_bits)
  logging.info('%d users (%d train / %d warm-up / %d test utterances), %d '
               'unseen speakers (%d utterances); BCH(%d,%d,t=%d).',
               splits.num_users, len(splits.train), len(splits.warmup),
               len(splits.test), len(splits.unseen_speakers),
               len(splits.unseen), code.n, code.k, code.t)
  config_json = json.loads(config.to_json_best_effort())
  rows, trials = {}, {}
  for name in names:
    key = jax.random.fold_in(variant_key, list(variants_lib.VARIANTS).index(
        name))
    new_rows, new_trials = run_variant(
        config, name, splits, codewords, key, hooks=hooks,
        workdir=os.path.join(workdir, 'variants', name))
    rows.update(new_rows)
    trials.update(new_trials)
    report.save_trials(new_trials, workdir)
    results = report.results(config_json, code, splits, rows)
    report.write_outputs(results, trials, workdir)
  return results


def build_variant(config, name: str, num_users: int, codewords: np.ndarray,
                  hooks: dict[str, Any] | None = None):
  """(model, loss_fn, trainable) of variant `name`."""
  kind = variants_lib.VARIANTS[name].kind
  dim = codewords.shape[1] if kind == 'feduv' else config.embedding_dim
  model = verification.build_verifier(
      kind, config.model, embedding_dim=dim, num_users=num_users,
      logit_scale=config.logit_scale, **validation.model_kwargs(config),
      **(hooks or {}))
  if kind == 'softmax':
    return model, verification.softmax_loss(model), None
  loss_fn = verification.feduv_loss(model, codes.to_signs(codewords),
                                    config.feduv_margin)
  # The paper's f(x) = W g(x) has no bias; a trainable one would let a client
  # map every input to its own codeword.
  return model, loss_fn, lambda path: path != 'head/projection/bias'


def train_variant(config, name: str, model, loss_fn, trainable, train_ds,
                  key: jax.Array, workdir: str) -> trainers.Trained:
  """Initialises the model from `key` and trains it as variant `name`."""
  init_key, train_key = jax.random.split(key)
  state0 = train.init_state(model, optax.sgd(1.0), train_ds.x[:1], init_key)
  variant = variants_lib.VARIANTS[name]
  if variant.federated:
    return trainers.train_federated(
        config, loss_fn, train_ds, state0.params, state0.model_state,
        train_key, dp=variant.dp, workdir=workdir, trainable=trainable)
  return trainers.train_central(
      config, loss_fn, train_ds, state0.params, state0.model_state,
      train_key, workdir=workdir, trainable=trainable)


def run_variant(config, name: str, splits, codewords: np.ndarray,
                key: jax.Array, *, workdir: str,
                hooks: dict[str, Any] | None = None
                ) -> tuple[dict[str, dict], dict[str, dict]]:
  """Trains and scores one variant.

  Returns:
    (rows, trials), both keyed by row name (`variants.row_name`): one per
    reference the variant is scored against, all from one trained model.
  """
  model, loss_fn, trainable = build_variant(config, name, splits.num_users,
                                            codewords, hooks)
  t0 = time.time()
  trained = train_variant(config, name, model, loss_fn, trainable,
                          splits.train, key, workdir)
  train_seconds = time.time() - t0
  embeddings = scoring.embed_splits(model, trained.params,
                                    trained.model_state, splits,
                                    config.eval_batch_size)
  kind, federated, _ = variants_lib.VARIANTS[name]
  common = {'train_seconds': train_seconds,
            'num_params': int(sum(np.size(v) for v in
                                  jax.tree.leaves(trained.params))),
            'shares_class_embeddings': kind == 'softmax' and federated,
            **trained.info}
  rows, trials = {}, {}
  for reference in variants_lib.references(name, config.feduv_references):
    row = variants_lib.row_name(name, reference)
    metrics, trials[row] = scoring.evaluate(
        config, kind, model, trained.params, trained.model_state, splits,
        codewords, reference, embeddings)
    rows[row] = {'variant': row, 'trained_as': name, 'reference': reference,
                 **metrics, **common}
    logging.info('%s: EER %.4f  TPR@FAR10%% %.4f  (%.0f s)', row,
                 rows[row]['eer'], rows[row].get('tpr_at_far0.1', np.nan),
                 train_seconds)
  return rows, trials
