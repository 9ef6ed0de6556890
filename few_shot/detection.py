"""Keyword detection rate at a fixed false-accept rate (FAR).

The spotter is the classifier plus a threshold, as in Speech Commands
keyword spotting where all other words form the "unknown" class (Warden
2018, "Speech Commands: A Dataset for Limited-Vocabulary Speech
Recognition"): on utterance u it predicts the class c = argmax_k p_k(u) and
fires keyword c when c is a keyword and p_c(u) exceeds the threshold.

* A false accept is a non-keyword utterance on which any keyword fires.
* A detection is a keyword utterance on which its own keyword fires; firing
  the wrong keyword, or not firing, is a miss.

The threshold is calibrated on the non-keyword utterances for a target
false-accept rate `far`: with n of them, at most floor(far * n) may fire,
so it is the (floor(far * n) + 1)-th highest of their firing scores (an
utterance whose top class is not a keyword has score -inf and never fires),
and the spotter fires when the score is strictly greater. Ties at the
threshold therefore never push the FAR above `far`. The detection rate at
that FAR is the point of the DET curve that keyword-spotting papers report
("detection rate at 5% FAR"), computed per user here.

Everything takes masks, so users with different numbers of utterances can
be padded to one shape and vmapped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def threshold_at_far(negative_scores: jax.Array, far: float,
                     mask: jax.Array | None = None) -> jax.Array:
  """The lowest threshold whose false-accept rate on negatives is <= far.

  Args:
    negative_scores: firing scores of negative utterances, any shape.
    far: target false-accept rate in [0, 1).
    mask: 1 for a real negative, 0 for padding (default: all real).

  Returns:
    Scalar threshold; the spotter fires when score > threshold. -inf when
    fewer than floor(far * n) + 1 negatives have a finite score.
  """
  if not 0.0 <= far < 1.0:
    raise ValueError(f'far must lie in [0, 1); got {far}.')
  scores = negative_scores.reshape(-1)
  valid = (jnp.ones_like(scores, bool) if mask is None
           else mask.reshape(-1) > 0)
  ranked = jnp.sort(jnp.where(valid, scores, -jnp.inf))[::-1]
  allowed = jnp.floor(far * jnp.sum(valid)).astype(jnp.int32)
  return ranked[jnp.minimum(allowed, ranked.shape[0] - 1)]


def spotter_scores(probs: jax.Array, keywords: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(predicted class [Q], firing score [Q]: its probability, or -inf when
  the predicted class is not a keyword)."""
  predicted = jnp.argmax(probs, axis=-1)
  is_keyword = jnp.any(predicted[:, None] == keywords[None, :], axis=1)
  top = jnp.take_along_axis(probs, predicted[:, None], axis=1)[:, 0]
  return predicted, jnp.where(is_keyword, top, -jnp.inf)


def detection_at_far(probs: jax.Array, labels: jax.Array, mask: jax.Array,
                     keywords: jax.Array, far: float
                     ) -> dict[str, jax.Array]:
  """Detection rate of `keywords` at false-accept rate `far`.

  Args:
    probs: [Q, num_classes] class probabilities of Q utterances.
    labels: [Q] true word of each utterance.
    mask: [Q] 1 for a real utterance, 0 for padding.
    keywords: [W] class indices of the keywords.
    far: target false-accept rate on non-keyword utterances.

  Returns:
    {'detection_rate', 'false_accept_rate' (achieved, <= far), 'threshold',
     'num_positive', 'num_negative'}.
  """
  predicted, score = spotter_scores(probs, keywords)
  real = mask > 0
  is_keyword = jnp.any(labels[:, None] == keywords[None, :], axis=1)
  positive, negative = real & is_keyword, real & ~is_keyword
  threshold = threshold_at_far(score, far, negative)
  fires = score > threshold
  num_pos, num_neg = jnp.sum(positive), jnp.sum(negative)
  return {
      'detection_rate': jnp.sum(fires & positive & (predicted == labels)) /
                        jnp.maximum(num_pos, 1),
      'false_accept_rate': jnp.sum(fires & negative) / jnp.maximum(num_neg, 1),
      'threshold': threshold,
      'num_positive': num_pos.astype(jnp.float32),
      'num_negative': num_neg.astype(jnp.float32)}
