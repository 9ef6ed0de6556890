"""FedUV vs softmax baselines on speaker verification: `run(config, workdir)`.

Trains each variant named in `config.variants` on the same splits
(`ondevice.data.verification`), scores the same trials and writes
`results.json`, `results.md` and `roc.png` to the work directory:

  central_softmax  softmax over users on pooled data (not private)
  fed_softmax      the same model by FedAvg: the softmax layer, i.e. every
                   user's class embedding, is shared with the server
  feduv            FedUV (Hosseini et al., ICML 2021): positive-only loss on
                   secret BCH codewords, nothing user-specific is shared
  *_dp             the federated ones with DP-FedAvg (`fedjax_ext.privacy`);
                   (epsilon, delta) is reported beside the metrics

A FedUV model is scored once per entry of `config.feduv_references`:
'codeword' (the paper: a user correlates an utterance's embedding with its
secret codeword; row 'feduv') and 'mean' (the cosine to the mean embedding
of the user's own training utterances, computed on the device, i.e. the
enrollment the softmax baselines use; row 'feduv_mean_ref'). Both keep
every embedding and codeword on the device; only the scoring differs.

Federated variants run `fedjax_ext.training.build_algorithm`'s round (one
`jit(vmap)` over the cohort); the centralised one runs
`ondevice.train.make_train_step`. Every key derives from `config.seed`.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_ext import codes
from fedjax_ext import cohort as cohort_lib
from fedjax_ext import privacy
from fedjax_ext import training
from fedjax_ext import verification
from ondevice import metric_writer
from ondevice import optim
from ondevice import train
from ondevice.data import verification as verification_data

# name -> (model kind, federated, differentially private)
VARIANTS = {
    'central_softmax': ('softmax', False, False),
    'fed_softmax': ('softmax', True, False),
    'feduv': ('feduv', True, False),
    'fed_softmax_dp': ('softmax', True, True),
    'feduv_dp': ('feduv', True, True),
}
# Reference a FedUV score compares with -> suffix of its row name.
FEDUV_REFERENCES = {'codeword': '', 'mean': '_mean_ref'}
REQUIRED_KEYS = ('data', 'split', 'model', 'norm', 'code', 'embedding_dim',
                 'logit_scale', 'feduv_margin', 'variants', 'central', 'dp',
                 'target_tpr', 'fars', 'seed') + training.REQUIRED_KEYS


def validate_config(config: ml_collections.ConfigDict) -> list[str]:
  """Checks the fields that need no data; returns the variant names."""
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ValueError(f'The config lacks the keys {missing}.')
  names = [v.strip() for v in config.variants.split(',') if v.strip()]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown or not names:
    raise ValueError(f'config.variants has unknown or no variants {unknown}; '
                     f'choose a comma-separated subset of {list(VARIANTS)}.')
  training.validate_config(config)
  references = tuple(config.get('feduv_references', ('codeword',)))
  bad = [r for r in references if r not in FEDUV_REFERENCES]
  if bad or not references or len(set(references)) < len(references):
    raise ValueError(f'config.feduv_references={references}: choose distinct '
                     f'entries of {tuple(FEDUV_REFERENCES)}.')
  if not 0 < config.target_tpr <= 1:
    raise ValueError(f'config.target_tpr must lie in (0, 1]; got '
                     f'{config.target_tpr}.')
  if any(VARIANTS[v][2] for v in names):
    privacy.DPConfig(noise_multiplier=config.dp.noise_multiplier,
                     clip_norm=config.dp.clip_norm,
                     expected_num_clients=config.cohort_size,
                     adaptive=config.dp.adaptive,
                     target_quantile=config.dp.target_quantile)
    if not 0 < config.dp.delta < 1:
      raise ValueError(f'config.dp.delta must lie in (0, 1); got '
                       f'{config.dp.delta}.')
  return names


def _model_kwargs(config) -> dict[str, Any]:
  kwargs = {'norm': config.norm}
  for key, value in config.get('model_kwargs', {}).items():
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  return kwargs


def train_federated(config, loss_fn, train_ds, params, model_state, key,
                    dp: bool, log_prefix: str, trainable=None):
  """FedAvg (optionally DP-FedAvg) rounds; returns (params, state, info)."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.dp.enabled = dp
  pool = cohort_lib.ClientPool.from_dataset(train_ds)
  if cfg.cohort_size > pool.num_clients:
    raise ValueError(f'config.cohort_size={cfg.cohort_size} exceeds the '
                     f'{pool.num_clients} training users.')
  algorithm = training.build_algorithm(cfg, loss_fn, pool.num_clients,
                                       trainable)
  state = algorithm.init(params, model_state)
  losses = []
  for r in range(cfg.num_rounds):
    sample_key, gather_key, apply_key = jax.random.split(
        jax.random.fold_in(key, r), 3)
    ids = cohort_lib.sample_clients(sample_key, pool.sizes, cfg.cohort_size)
    cohort = cohort_lib.gather_cohort(train_ds, ids,
                                      cfg.max_examples_per_client, gather_key,
                                      pool)
    state, metrics = algorithm.apply(state, cohort, ids, apply_key)
    losses.append(float(metrics['train_loss']))
    if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.num_rounds:
      logging.info('%s round %d/%d  train loss %.4f  train acc %.3f',
                   log_prefix, r + 1, cfg.num_rounds, losses[-1],
                   float(metrics['train_accuracy']))
  info = {'rounds': cfg.num_rounds, 'final_train_loss': losses[-1],
          'train_loss_curve': losses}
  if dp:
    info['dp_epsilon'] = privacy.compute_epsilon(
        cfg.dp.noise_multiplier, cfg.cohort_size / pool.num_clients,
        cfg.num_rounds, cfg.dp.delta)
    info['dp_delta'] = cfg.dp.delta
    info['dp_noise_multiplier'] = cfg.dp.noise_multiplier
    info['dp_clip_norm'] = cfg.dp.clip_norm
  return state.params, state.model_state, info


def train_central(config, loss_fn, train_ds, params, model_state, key,
                  log_prefix: str, trainable=None):
  """Minibatch training on pooled data; returns (params, state, info)."""
  central = config.central
  optimizer = optim.build_optimizer(central)
  state = train.state_from_params(params, model_state, optimizer, trainable)
  step = jax.jit(train.make_train_step(
      loss_fn, optimizer, train.resolve_trainable(params, trainable)))
  data_key, step_key = jax.random.split(key)
  n, b = len(train_ds), central.batch_size
  per_epoch = n // b
  losses = []
  for s in range(central.num_steps):
    epoch, i = divmod(s, per_epoch)
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(data_key, epoch), n))
    index = order[i * b:(i + 1) * b]
    batch = {'x': train_ds.x[index], 'y': train_ds.y[index],
             'mask': np.ones(b, np.float32)}
    state, metrics = step(state, batch, jax.random.fold_in(step_key, s))
    losses.append(float(metrics['loss']))
    if (s + 1) % max(central.num_steps // 5, 1) == 0:
      logging.info('%s step %d/%d  loss %.4f', log_prefix, s + 1,
                   central.num_steps, np.mean(losses[-20:]))
  return state.params, state.model_state, {
      'steps': central.num_steps, 'final_train_loss': losses[-1]}


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(model, params, model_state, x):
  # Modules are hashable dataclasses: equal models share one compilation.
  return verification.embed(model, {'params': params, **model_state}, x)


def embed_all(model, params, model_state, x: np.ndarray,
              batch_size: int = 512) -> np.ndarray:
  """Unit-norm scoring embeddings of every row of x, in padded batches."""
  batch_size = min(batch_size, len(x))
  out = []
  for start in range(0, len(x), batch_size):
    xb = x[start:start + batch_size]
    padded = train.pad_batch(xb, np.zeros(len(xb), np.int32), batch_size)
    out.append(np.asarray(_embed_batch(model, params, model_state,
                                       padded['x']))[:len(xb)])
  return np.concatenate(out)


def embed_splits(model, params, model_state, splits
                 ) -> dict[str, np.ndarray]:
  """Embeddings of every split's utterances, keyed by split name."""
  return {name: embed_all(model, params, model_state, getattr(splits, name).x)
          for name in ('train', 'warmup', 'test', 'unseen')}


def evaluate(config, kind, model, params, model_state, splits, codewords,
             reference: str | None = None,
             embeddings: dict[str, np.ndarray] | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Scores every trial; returns (metrics, trials).

  Args:
    reference: 'codeword' (FedUV's default) or 'mean' (the softmax models'
      only one): what each user's scores compare with.
    embeddings: `embed_splits` of this model, to score several references
      without embedding again (None: computed here).
  """
  reference = reference or ('codeword' if kind == 'feduv' else 'mean')
  if reference == 'codeword' and kind != 'feduv':
    raise ValueError('Only a FedUV model has codeword references; a softmax '
                     "model enrolls with reference='mean'.")
  emb = embeddings or embed_splits(model, params, model_state, splits)
  if reference == 'codeword':
    refs = verification.codeword_references(codes.to_signs(codewords))
  elif reference == 'mean':  # Enrollment = the user's own train utterances.
    refs = verification.mean_references(emb['train'], splits.train.y,
                                        splits.num_users)
  else:
    raise ValueError(f'reference={reference!r}: choose one of '
                     f'{tuple(FEDUV_REFERENCES)}.')
  scores = {k: verification.score_matrix(emb[k], refs)
            for k in ('warmup', 'test', 'unseen')}
  trials = verification.trial_scores(scores['test'], splits.test.y,
                                     scores['unseen'])
  metrics = verification.verification_metrics(trials, tuple(config.fars))
  warm = scores['warmup'][np.arange(len(splits.warmup)), splits.warmup.y]
  thresholds = verification.warmup_thresholds(
      warm, splits.warmup.y, splits.num_users, config.target_tpr)
  point = verification.per_user_operating_point(
      scores['test'], splits.test.y, scores['unseen'], thresholds)
  metrics.update({f'warmup_threshold_{k}': v for k, v in point.items()})
  return metrics, trials


def run_variant(config, name, splits, codewords, key
                ) -> tuple[dict[str, dict], dict[str, dict]]:
  """Trains and evaluates one variant.

  Returns:
    (rows, trials), both keyed by row name: the variant's name, and for a
    FedUV variant one row per `config.feduv_references` entry (the name plus
    FEDUV_REFERENCES' suffix), all scored from the same trained model.
  """
  kind, federated, dp = VARIANTS[name]
  dim = codewords.shape[1] if kind == 'feduv' else config.embedding_dim
  model = verification.build_verifier(
      kind, config.model, embedding_dim=dim, num_users=splits.num_users,
      logit_scale=config.logit_scale, **_model_kwargs(config))
  init_key, train_key = jax.random.split(key)
  state0 = train.init_state(model, optax.sgd(1.0), splits.train.x[:1],
                            init_key)
  trainable = None
  if kind == 'feduv':
    loss_fn = verification.feduv_loss(model, codes.to_signs(codewords),
                                      config.feduv_margin)
    # The paper's f(x) = W g(x) has no bias; a trainable one would let a
    # client map every input to its own codeword.
    trainable = lambda path: path != 'head/projection/bias'
  else:
    loss_fn = verification.softmax_loss(model)
  t0 = time.time()
  if federated:
    params, model_state, info = train_federated(
        config, loss_fn, splits.train, state0.params, state0.model_state,
        train_key, dp, name, trainable)
  else:
    params, model_state, info = train_central(
        config, loss_fn, splits.train, state0.params, state0.model_state,
        train_key, name, trainable)
  train_seconds = time.time() - t0
  references = (tuple(config.get('feduv_references', ('codeword',)))
                if kind == 'feduv' else ('mean',))
  embeddings = embed_splits(model, params, model_state, splits)
  rows, trials = {}, {}
  for reference in references:
    row_name = name + (FEDUV_REFERENCES[reference] if kind == 'feduv' else '')
    metrics, trials[row_name] = evaluate(config, kind, model, params,
                                         model_state, splits, codewords,
                                         reference, embeddings)
    rows[row_name] = {
        'variant': row_name, 'trained_as': name, 'reference': reference,
        **metrics, 'train_seconds': train_seconds,
        'num_params': int(sum(np.size(v) for v in
                              jax.tree.leaves(state0.params))),
        'shares_class_embeddings': kind == 'softmax' and federated, **info}
    logging.info('%s: EER %.4f  TPR@FAR10%% %.4f  (%.0f s)', row_name,
                 rows[row_name]['eer'],
                 rows[row_name].get('tpr_at_far0.1', float('nan')),
                 train_seconds)
  return rows, trials


def goals(rows: dict[str, dict]) -> list[dict[str, Any]]:
  """The issue's measured goals, for every (FedUV, softmax) pair present."""
  out = []
  for dp in ('', '_dp'):
    for ref in FEDUV_REFERENCES.values():
      name = f'feduv{dp}{ref}'
      uv, sm = rows.get(name), rows.get('fed_softmax' + dp)
      if uv is None:
        continue
      if sm is not None:
        ratio = uv['eer'] / max(sm['eer'], 1e-12)
        out.append({'goal': f'EER({name}) <= 1.5 x EER(fed_softmax{dp})',
                    'value': ratio, 'met': ratio <= 1.5})
      tpr = uv.get('tpr_at_far0.1')
      if tpr is not None:
        out.append({'goal': f'TPR@FAR10% ({name}) > 0.8', 'value': tpr,
                    'met': tpr > 0.8})
  return out


def row_order(names) -> list[str]:
  """Row names in VARIANTS order, each variant's references after it."""
  names = set(names)
  return [n for v in VARIANTS
          for n in [v] + [v + s for s in FEDUV_REFERENCES.values() if s]
          if n in names]


def plot_roc(trials_by_variant: dict[str, dict], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  for name, trials in trials_by_variant.items():
    far, tpr, _ = verification.roc_curve(trials['genuine'],
                                         trials['impostor'])
    # A million points draw slowly: the best TPR at each FAR of a grid.
    grid = np.logspace(-4, 0, 300)
    ax.plot(grid, tpr[np.searchsorted(far, grid, side='right') - 1],
            label=name)
  ax.set_xscale('log')
  ax.set_xlim(1e-4, 1)
  ax.set_xlabel('false accept rate (all impostors)')
  ax.set_ylabel('true positive rate')
  ax.axvline(0.01, color='grey', lw=0.5, ls=':')
  ax.axvline(0.1, color='grey', lw=0.5, ls=':')
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right')
  ax.set_title('Speaker verification ROC, unseen-utterance trials')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every variant, writes results.json / results.md / roc.png."""
  names = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  splits = verification_data.load_verification_splits(config)
  code = codes.bch_code(config.code.m, config.code.t)
  root = jax.random.key(config.seed)
  code_key, variant_key = jax.random.split(root)
  codewords = codes.user_codewords(code, np.arange(splits.num_users),
                                   splits.num_users, code_key,
                                   config.code.min_random_bits)
  logging.info('%d users (%d train / %d warm-up / %d test utterances), %d '
               'unseen speakers (%d utterances); BCH(%d,%d,t=%d).',
               splits.num_users, len(splits.train), len(splits.warmup),
               len(splits.test), len(splits.unseen_speakers),
               len(splits.unseen), code.n, code.k, code.t)
  rows, trials = {}, {}
  for i, name in enumerate(names):
    # Keys by variant name, so a variant's numbers do not depend on which
    # others run in the same process.
    new_rows, new_trials = run_variant(
        config, name, splits, codewords,
        jax.random.fold_in(variant_key, list(VARIANTS).index(name)))
    rows.update(new_rows)
    trials.update(new_trials)
    for row_name, row_trials in new_trials.items():
      np.savez_compressed(os.path.join(workdir, f'trials_{row_name}.npz'),
                          **row_trials)
    results = {  # Rewritten after every variant: a killed run keeps them.
        'code': {'n': code.n, 'k': code.k, 't': code.t,
                 'min_distance_lower_bound': code.designed_distance},
        'num_users': splits.num_users,
        'num_unseen_speakers': len(splits.unseen_speakers),
        'utterances': {k: len(getattr(splits, k))
                       for k in ('train', 'warmup', 'test', 'unseen')},
        'variants': rows, 'goals': goals(rows),
        'config': json.loads(config.to_json_best_effort()),
    }
    write_outputs(results, trials, workdir)
  return results


def write_outputs(results, trials, workdir) -> None:
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  plot_roc(trials, os.path.join(workdir, 'roc.png'))
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown_report(results))


def combine(workdirs, out_dir: str) -> dict[str, Any]:
  """Merges runs of different variants (same data, code and seed) into one.

  Raises:
    ValueError: when the runs' configs differ in anything but `variants`.
  """
  merged, trials, reference = None, {}, None
  for d in workdirs:
    with open(os.path.join(d, 'results.json')) as f:
      res = json.load(f)
    config = dict(res['config'], variants=None)
    if reference is None:
      reference, merged = config, dict(res, variants={})
    elif config != reference:
      diff = sorted(k for k in set(config) | set(reference)
                    if config.get(k) != reference.get(k))
      raise ValueError(f'Runs in {workdirs} differ in config keys {diff}; '
                       'only `variants` may differ.')
    for name, row in res['variants'].items():
      merged['variants'][name] = row
      with np.load(os.path.join(d, f'trials_{name}.npz')) as z:
        trials[name] = {k: z[k] for k in z.files}
  order = row_order(merged['variants'])
  merged['variants'] = {v: merged['variants'][v] for v in order}
  trials = {v: trials[v] for v in order}
  trained = {r.get('trained_as', n) for n, r in merged['variants'].items()}
  merged['config']['variants'] = ','.join(v for v in VARIANTS if v in trained)
  merged['goals'] = goals(merged['variants'])
  os.makedirs(out_dir, exist_ok=True)
  write_outputs(merged, trials, out_dir)
  return merged


def markdown_report(results: dict[str, Any]) -> str:
  fars = results['config']['fars']
  rows = []
  for name, r in results['variants'].items():
    row = {'variant': name, 'EER': r['eer']}
    for far in fars:
      row[f'TPR@FAR{far:g}'] = r[f'tpr_at_far{far:g}']
    row.update({'EER unseen impostors': r['unseen_eer'],
                'warm-up TPR': r['warmup_threshold_tpr'],
                'warm-up FAR': r['warmup_threshold_far'],
                'epsilon': r.get('dp_epsilon', '-'),
                'delta': r.get('dp_delta', '-'),
                'shares class embeddings': r['shares_class_embeddings'],
                'train s': r['train_seconds']})
    rows.append(row)
  code = results['code']
  lines = [
      '# FedUV vs softmax baselines: speaker verification',
      '',
      f"{results['num_users']} seen users (synthesised speakers), "
      f"{results['num_unseen_speakers']} unseen speakers as extra impostors; "
      f"BCH({code['n']},{code['k']}) codewords, t={code['t']}, d_min >= "
      f"{code['min_distance_lower_bound']}. Trials: every test (unseen) "
      'utterance of a seen user against every seen user, and every unseen '
      "speaker's utterance against every seen user. Warm-up: each user's "
      f"threshold for TPR {results['config']['target_tpr']} on its own "
      'warm-up utterances.',
      '', metric_writer.markdown_table(rows), '',
      '## Goals', '', metric_writer.markdown_table(results['goals']), ''
  ]
  return '\n'.join(lines)
