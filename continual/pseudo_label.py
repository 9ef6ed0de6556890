"""Pseudo-labels accepted only when a verification step agrees.

Self-training from a device's unlabelled audio fails when wrong labels feed
back into the model. A clip therefore gets a label only if

  1. the keyword classifier is confident: max softmax probability >=
     `confidence`, and
  2. keyword verification agrees: the cosine similarity between the clip's
     embedding and the user's enrollment template of the predicted keyword is
     >= `threshold`.

A template is the mean of the unit-norm embeddings of the user's K
enrollment utterances of a keyword (a prototype, as in Snell et al. 2017's
prototypical networks and the d-vector enrollment of Variani et al. 2014).
Embeddings are centred on the mean enrollment embedding first: pooled ReLU
features all point into the positive orthant, and centring spreads them out.

The threshold is calibrated on enrollment data alone for a target false-
accept rate (FAR): impostor trials are (utterance, template of another
keyword) pairs, genuine trials compare an utterance with its own keyword's
template built without it (leave-one-out). Precision and recall against the
hidden truth are measured by `label_quality`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ondevice.models import l2_normalize


class Templates(NamedTuple):
  """Per-keyword enrollment templates.

  Attributes:
    centre: [D] mean enrollment embedding, subtracted before comparing.
    sums: [C, D] sum of a keyword's centred unit-norm enrollment embeddings.
    counts: [C] enrollment utterances of each keyword (0: not enrolled).
  """
  centre: jax.Array
  sums: jax.Array
  counts: jax.Array


def _unit(embeddings: jax.Array, centre: jax.Array) -> jax.Array:
  return l2_normalize(jnp.asarray(embeddings, jnp.float32) - centre)


@functools.partial(jax.jit, static_argnames=('num_classes', 'centre'))
def build_templates(embeddings: jax.Array, labels: jax.Array,
                    num_classes: int, centre: bool = True) -> Templates:
  """Templates from enrollment embeddings [N, D] with labels [N]."""
  embeddings = jnp.asarray(embeddings, jnp.float32)
  mean = (jnp.mean(embeddings, axis=0) if centre else
          jnp.zeros(embeddings.shape[-1], jnp.float32))
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return Templates(centre=mean, sums=one_hot.T @ _unit(embeddings, mean),
                   counts=one_hot.sum(axis=0))


@jax.jit
def template_scores(templates: Templates, embeddings: jax.Array) -> jax.Array:
  """Cosine similarity [N, C] of each clip to each keyword's template.

  Keywords without enrollment utterances score -inf, so they never verify.
  """
  protos = l2_normalize(templates.sums)
  scores = _unit(embeddings, templates.centre) @ protos.T
  return jnp.where(templates.counts[None] > 0, scores, -jnp.inf)


@jax.jit
def enrollment_trials(templates: Templates, embeddings: jax.Array,
                      labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Genuine and impostor scores of the enrollment utterances themselves.

  Args:
    templates: built from exactly (embeddings, labels).
    embeddings: [N, D] enrollment embeddings.
    labels: [N].

  Returns:
    (genuine [N], impostor [N, C - 1]): the genuine score leaves the
    utterance out of its own template (NaN where it was the only one); the
    impostor scores compare it with every other enrolled keyword (-inf for
    keywords that are not enrolled).
  """
  unit = _unit(embeddings, templates.centre)
  num_classes = templates.sums.shape[0]
  own = templates.sums[labels] - unit
  own_norm = jnp.linalg.norm(own, axis=-1)
  genuine = jnp.where(templates.counts[labels] > 1,
                      jnp.sum(unit * own, -1) / jnp.maximum(own_norm, 1e-12),
                      jnp.nan)
  scores = template_scores(templates, embeddings)
  # Column j of row i is keyword j, skipping the row's own keyword.
  columns = jnp.arange(num_classes - 1)[None, :]
  others = columns + (columns >= labels[:, None])
  return genuine, jnp.take_along_axis(scores, others, axis=1)


def calibrate_threshold(impostor_scores, target_far: float) -> float:
  """The lowest threshold whose false-accept rate is at most `target_far`.

  A trial is accepted when its score >= threshold. With n finite impostor
  scores sorted in decreasing order s_0 >= s_1 >= ..., the threshold lies
  just above s_m for m = floor(target_far * n), so at most m of the n
  impostors (FAR <= target_far) are accepted, and exactly m when the
  scores have no ties.
  """
  if not 0.0 <= target_far < 1.0:
    raise ValueError(f'target_far must lie in [0, 1); got {target_far}.')
  scores = np.asarray(impostor_scores, np.float64).ravel()
  scores = np.sort(scores[np.isfinite(scores)])[::-1]
  if scores.size == 0:
    raise ValueError('No finite impostor score to calibrate on: enroll at '
                     'least two keywords.')
  m = int(np.floor(target_far * scores.size))
  return float(np.nextafter(scores[m], np.inf))


def false_accept_rate(impostor_scores, threshold: float) -> float:
  scores = np.asarray(impostor_scores, np.float64).ravel()
  scores = scores[np.isfinite(scores)]
  return float(np.mean(scores >= threshold))


class PseudoLabels(NamedTuple):
  """labels: the classifier's argmax; accepted: bool, the label is used."""
  labels: jax.Array
  accepted: jax.Array
  confidence: jax.Array
  similarity: jax.Array


def pseudo_label(logits: jax.Array, scores: jax.Array, confidence: float,
                 threshold: float, verify: bool = True) -> PseudoLabels:
  """Accepts a clip when it is confident and (if `verify`) verified.

  Args:
    logits: [N, C] classifier outputs.
    scores: [N, C] template similarities (`template_scores`).
    confidence: minimum softmax probability of the predicted class.
    threshold: minimum similarity to the predicted keyword's template.
    verify: False accepts on confidence alone (the no-verification
      baseline).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  labels = jnp.argmax(logits, axis=-1)
  conf = jnp.max(probs, axis=-1)
  similarity = jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]
  accepted = conf >= confidence
  if verify:
    accepted &= similarity >= threshold
  return PseudoLabels(labels, accepted, conf, similarity)


def label_quality(labels, accepted, truth, positive) -> dict[str, float]:
  """Precision and recall of pseudo-labels against the hidden truth.

  Args:
    labels: [N] pseudo-labels.
    accepted: [N] bool, which pseudo-labels are used.
    truth: [N] true label (-1 where the clip has no keyword: never correct).
    positive: [N] bool, the clips a perfect labeller would label (e.g. the
      user's keyword utterances); recall is over these.

  Returns:
    {'precision': correct accepted / accepted (1.0 when none is),
     'recall': correct accepted positives / positives,
     'accepted', 'correct', 'positives'} as floats.
  """
  labels, accepted, truth, positive = (np.asarray(a) for a in
                                       (labels, accepted, truth, positive))
  accepted = accepted.astype(bool)
  correct = accepted & (labels == truth) & (truth >= 0)
  n_acc, n_pos = int(accepted.sum()), int(positive.sum())
  return {'precision': float(correct.sum() / n_acc) if n_acc else 1.0,
          'recall': (float((correct & positive.astype(bool)).sum() / n_pos)
                     if n_pos else 0.0),
          'accepted': float(n_acc), 'correct': float(correct.sum()),
          'positives': float(n_pos)}
