"""Scoring a trained verifier: embeddings, trials and verification metrics.

Every seen user's test utterance is scored against every seen user (genuine
when it is the speaker's own), and every unseen speaker's utterance against
every seen user (impostors). A user's reference is its secret codeword
(FedUV) or the mean embedding of its own training utterances; each user
also sets its own threshold on its warm-up utterances
(`verification.warmup_thresholds`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from fedjax_ext import codes
from fedjax_ext import verification
from fedjax_ext.feduv import variants as variants_lib
from ondevice import train
from ondevice.data import verification as verification_data

SPLITS = ('train', 'warmup', 'test', 'unseen')


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(model, params, model_state, x):
  # Modules are hashable dataclasses: equal models share one compilation.
  return verification.embed(model, {'params': params, **model_state}, x)


def embed_all(model, params, model_state, x: np.ndarray,
              batch_size: int = 512) -> np.ndarray:
  """Unit-norm scoring embeddings of every row of x, in padded batches."""
  if batch_size < 1:
    raise ValueError(f'config.eval_batch_size must be >= 1; got '
                     f'{batch_size}.')
  out = []
  for start in range(0, len(x), batch_size):
    xb = x[start:start + batch_size]
    padded = train.pad_batch(xb, np.zeros(len(xb), np.int32), batch_size)
    out.append(np.asarray(_embed_batch(model, params, model_state,
                                       padded['x']))[:len(xb)])
  return np.concatenate(out)


def embed_splits(model, params, model_state,
                 splits: verification_data.VerificationSplits,
                 batch_size: int = 512) -> dict[str, np.ndarray]:
  """Embeddings of every split's utterances, keyed by split name.

  Every split is embedded in batches of one size (the largest split's when
  that is below `batch_size`), so the embedding compiles once.
  """
  batch_size = min(batch_size, max(len(getattr(splits, name))
                                   for name in SPLITS))
  return {name: embed_all(model, params, model_state,
                          getattr(splits, name).x, batch_size)
          for name in SPLITS}


def references(reference: str, kind: str, embeddings, splits, codewords
               ) -> np.ndarray:
  """Each user's reference vector [num_users, d] for `reference`."""
  if reference == 'codeword':
    if kind != 'feduv':
      raise ValueError('Only a FedUV model has codeword references; a '
                       "softmax model enrolls with reference='mean'.")
    return verification.codeword_references(codes.to_signs(codewords))
  if reference == 'mean':  # Enrollment = the user's own train utterances.
    return verification.mean_references(embeddings['train'], splits.train.y,
                                        splits.num_users)
  raise ValueError(f'reference={reference!r}: choose one of '
                   f'{tuple(variants_lib.REFERENCE_SUFFIX)}.')


def evaluate(config, kind: str, model, params, model_state, splits,
             codewords, reference: str | None = None,
             embeddings: dict[str, np.ndarray] | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Scores every trial; returns (metrics, trials).

  Args:
    config: reads `fars`, `target_tpr` and `eval_batch_size`.
    kind: 'feduv' or 'softmax'.
    reference: 'codeword' (FedUV's default) or 'mean' (the softmax models'
      only one): what each user's scores compare with.
    embeddings: `embed_splits` of this model, to score several references
      without embedding again (None: computed here).
  """
  reference = reference or ('codeword' if kind == 'feduv' else 'mean')
  emb = embeddings or embed_splits(model, params, model_state, splits,
                                   config.eval_batch_size)
  refs = references(reference, kind, emb, splits, codewords)
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
