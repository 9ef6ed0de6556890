"""User verification: FedUV's positive-only loss, softmax baselines, metrics.

FedUV (Hosseini et al., ICML 2021, "Federated Learning of User Verification
Models Without Sharing Embeddings"): the model is f(x) = W g(x), with W
[n, d] shared and trained by federated averaging, and user u holds a secret
+-1 codeword v_u of length n (`codes.user_codewords`). We normalise f to
||f(x)|| = sqrt(n), so the paper's positive loss

    l_pos(x, v_u) = max(0, margin - v_u^T f(x) / n)

is a hinge on the cosine between W g(x) and v_u. No user needs any other
user's codeword or embedding: the code's minimum distance keeps codewords,
and so the users' embeddings, apart. A user accepts x when v_u^T f(x) / n
exceeds its own threshold, set in a warm-up on its own utterances for a
target true-positive rate. The user may instead compare with the mean
embedding of its own training utterances (`mean_references`), which never
leaves the device either; benchmarks/results/feduv measures both.

Baselines: a softmax over all training users (cosine logits, NormFace style:
Wang et al. 2017), trained centrally or federated; federating it shares
every user's class embedding (the rows of the softmax layer) with the
server, which FedUV avoids. They verify by the cosine between an utterance's
embedding and the user's mean enrollment embedding.

Metrics are the usual ones of speaker verification: ROC, equal error rate
(EER), TPR at a fixed FAR. A trial is accepted when its score is >= the
threshold.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ondevice import models
from ondevice import train

PyTree = Any


class CosineSoftmaxModel(nn.Module):
  """Unit-norm embedding and cosine logits over the training users.

  Attributes:
    embedder: an `EmbeddingModel` (unit-norm output).
    num_users: classes of the softmax.
    logit_scale: s in logits = s * cos(embedding, class embedding).
    dot_general: replaces lax.dot_general in the cosine layer (None: lax's).
    dot_general_cls: a module class that does so instead (e.g.
      `quantized_training.Int8DotGeneral`); the hooks every model takes
      (`models.QUANT_HOOKS`).
  """
  embedder: Any
  num_users: int
  logit_scale: float = 16.0
  dot_general: Any = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    emb = self.embedder(x, train)
    kernel = self.param('classifier', nn.initializers.normal(1.0),
                        (emb.shape[-1], self.num_users))
    unit = models.l2_normalize(kernel, axis=0)
    if self.dot_general_cls is not None:
      dot_general = self.dot_general_cls()
    elif self.dot_general is not None:
      dot_general = self.dot_general
    else:
      return self.logit_scale * emb @ unit
    return self.logit_scale * dot_general(
        emb, unit, (((emb.ndim - 1,), (0,)), ((), ())))

  def embed(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.embedder(x, train)


VARIANT_KINDS = ('feduv', 'softmax')


def build_verifier(kind: str, backbone: str, *, embedding_dim: int,
                   num_users: int, logit_scale: float = 16.0,
                   dot_general: Any = None, dot_general_cls: Any = None,
                   **backbone_kwargs) -> nn.Module:
  """The FedUV model (an `EmbeddingModel` of dim n) or a softmax model.

  The quantisation hooks (`models.QUANT_HOOKS`, e.g. from
  `quantized_training.get_quant(name).model_kwargs()`) reach the backbone,
  the embedding and the softmax layer; the convolution hooks travel in
  `backbone_kwargs`.
  """
  if kind not in VARIANT_KINDS:
    raise ValueError(f'Unknown verifier kind {kind!r}; choose one of '
                     f'{VARIANT_KINDS}.')
  embedder = models.build_embedding_model(
      backbone, embedding_dim, dot_general=dot_general,
      dot_general_cls=dot_general_cls, **backbone_kwargs)
  if kind == 'feduv':
    return embedder
  if num_users < 2:
    raise ValueError(f'A softmax over users needs num_users >= 2; got '
                     f'{num_users}.')
  return CosineSoftmaxModel(embedder=embedder, num_users=num_users,
                            logit_scale=logit_scale, dot_general=dot_general,
                            dot_general_cls=dot_general_cls)


def embed(model: nn.Module, variables: PyTree, x: jax.Array) -> jax.Array:
  """Unit-norm embeddings used for scoring (f(x) / sqrt(n) for FedUV)."""
  if isinstance(model, CosineSoftmaxModel):
    return model.apply(variables, x, method=model.embed)
  return model.apply(variables, x)


def feduv_loss(model: nn.Module, codewords: jax.Array,
               margin: float = 1.0) -> train.LossFn:
  """FedUV's positive-only loss as an `ondevice.train.LossFn`.

  Args:
    model: unit-norm embedder of dimension n (`build_verifier('feduv')`).
    codewords: +-1 float [num_users, n]. In this simulation the table is
      indexed by the batch's labels; a client's batches hold only its own
      label, so its update depends only on its own codeword.
    margin: hinge margin on the cosine, in (0, 1].

  Returns:
    A LossFn; aux metrics 'loss_sum', 'count' and, as a simulation-only
    diagnostic, 'correct' (the nearest codeword is the user's own).
  """
  codewords = jnp.asarray(codewords, jnp.float32)
  if codewords.ndim != 2:
    raise ValueError(f'codewords must be [num_users, n]; got shape '
                     f'{codewords.shape}.')
  if not 0.0 < margin <= 1.0:
    raise ValueError(f'FedUV margin must lie in (0, 1]; got {margin}.')
  n = codewords.shape[1]
  if getattr(model, 'embedding_dim', n) != n:
    raise ValueError(
        f'The FedUV model outputs {model.embedding_dim} dims but codewords '
        f'have length {n}; set embedding_dim to the code length n.')
  unit_codes = codewords / jnp.sqrt(n)

  def loss_fn(params, model_state, batch, rng):
    variables = {'params': params, **model_state}
    # The streams `train.make_train_step` gives a model: dropout, and the
    # stochastic rounding of a quantised one.
    dropout_rng, quant_rng = jax.random.split(rng)
    rngs = {'dropout': dropout_rng, 'quant': quant_rng}
    f = model.apply(variables, batch['x'], train=True, rngs=rngs)
    mask = batch['mask'].astype(jnp.float32)
    own = jnp.take(unit_codes, batch['y'], axis=0)
    corr = jnp.sum(f * own, axis=-1)
    per_example = jnp.maximum(0.0, margin - corr)
    nearest = jnp.argmax(f @ unit_codes.T, axis=-1) == batch['y']
    sums = {'loss_sum': jnp.sum(per_example * mask),
            'correct': jnp.sum(nearest.astype(jnp.float32) * mask),
            'count': jnp.sum(mask)}
    return train.masked_mean(per_example, mask), (sums, model_state)

  return loss_fn


def softmax_loss(model: nn.Module) -> train.LossFn:
  """Cross-entropy over users (the baselines): `train.classification_loss`."""
  return train.classification_loss(model)


# ---------------------------------------------------------------- scoring


def mean_references(embeddings: np.ndarray, users: np.ndarray,
                    num_users: int) -> np.ndarray:
  """Unit-norm mean enrollment embedding of each user [num_users, d]."""
  embeddings = np.asarray(embeddings, np.float64)
  users = np.asarray(users)
  counts = np.bincount(users, minlength=num_users)
  if len(counts) > num_users or np.any(counts == 0):
    raise ValueError(f'Every user in [0, {num_users}) needs >= 1 enrollment '
                     f'embedding; counts are {counts.tolist()}.')
  sums = np.zeros((num_users, embeddings.shape[1]))
  np.add.at(sums, users, embeddings)
  return sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-12)


def codeword_references(codewords: np.ndarray) -> np.ndarray:
  """v_u / sqrt(n): cosine with a unit embedding is v_u^T f / n."""
  codewords = np.asarray(codewords, np.float64)
  if not np.isin(codewords, (-1.0, 1.0)).all():
    raise ValueError('codeword_references needs +-1 codewords; convert 0/1 '
                     'bits with codes.to_signs.')
  return codewords / np.sqrt(codewords.shape[1])


def score_matrix(embeddings: np.ndarray, references: np.ndarray
                 ) -> np.ndarray:
  """Cosine scores [num_utterances, num_users]."""
  if embeddings.shape[1] != references.shape[1]:
    raise ValueError(f'Embeddings have {embeddings.shape[1]} dims but '
                     f'references {references.shape[1]}.')
  return np.asarray(embeddings, np.float64) @ np.asarray(references).T


def trial_scores(seen_scores: np.ndarray, seen_users: np.ndarray,
                 unseen_scores: np.ndarray) -> dict[str, np.ndarray]:
  """Genuine and impostor scores of every trial.

  Args:
    seen_scores: [E, U] scores of seen users' test utterances.
    seen_users: [E] speaker (user index) of each of those utterances.
    unseen_scores: [F, U] scores of unseen speakers' utterances.

  Returns:
    'genuine' [E]: score against the speaker's own user; 'impostor_seen'
    [E * (U - 1)]: against every other seen user; 'impostor_unseen'
    [F * U]: unseen speakers against every user; 'impostor': both.
  """
  seen_users = np.asarray(seen_users)
  own = np.zeros(seen_scores.shape, bool)
  own[np.arange(len(seen_users)), seen_users] = True
  impostor_seen = seen_scores[~own]
  impostor_unseen = np.asarray(unseen_scores).reshape(-1)
  return {'genuine': seen_scores[own], 'impostor_seen': impostor_seen,
          'impostor_unseen': impostor_unseen,
          'impostor': np.concatenate([impostor_seen, impostor_unseen])}


# ---------------------------------------------------------------- metrics


def roc_curve(genuine: np.ndarray, impostor: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(far, tpr, thresholds) for accept-if-score>threshold, all cut points.

  Thresholds run from +inf (nothing accepted: the point (0, 0)) down through
  every distinct score; point i accepts the trials with score >=
  thresholds[i].
  """
  genuine = np.asarray(genuine, np.float64).reshape(-1)
  impostor = np.asarray(impostor, np.float64).reshape(-1)
  if genuine.size == 0 or impostor.size == 0:
    raise ValueError('ROC needs at least one genuine and one impostor score; '
                     f'got {genuine.size} and {impostor.size}.')
  scores = np.concatenate([genuine, impostor])
  labels = np.concatenate([np.ones(genuine.size), np.zeros(impostor.size)])
  order = np.argsort(-scores, kind='stable')
  scores, labels = scores[order], labels[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tp = np.cumsum(labels)[last]
  fp = np.cumsum(1 - labels)[last]
  tpr = np.r_[0.0, tp / genuine.size]
  far = np.r_[0.0, fp / impostor.size]
  return far, tpr, np.r_[np.inf, scores[last]]


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> float:
  """The rate where FAR = FRR (1 - TPR), linear between ROC points."""
  far, tpr, _ = roc_curve(genuine, impostor)
  frr = 1.0 - tpr
  diff = far - frr  # Increases from -1 (nothing accepted) to +1.
  i = int(np.argmax(diff >= 0))
  if diff[i] == 0:
    return float(far[i])
  # Crossing between points i-1 (diff < 0) and i (diff > 0).
  w = -diff[i - 1] / (diff[i] - diff[i - 1])
  return float(far[i - 1] + w * (far[i] - far[i - 1]))


def tpr_at_far(genuine: np.ndarray, impostor: np.ndarray,
               far: float) -> float:
  """Highest TPR over thresholds whose FAR is <= `far`."""
  if not 0.0 <= far < 1.0:
    raise ValueError(f'far must lie in [0, 1); got {far}.')
  fars, tprs, _ = roc_curve(genuine, impostor)
  return float(np.max(tprs[fars <= far + 1e-12]))


def warmup_thresholds(scores: np.ndarray, users: np.ndarray, num_users: int,
                      target_tpr: float) -> np.ndarray:
  """Each user's threshold from its own warm-up scores, for `target_tpr`.

  User u with warm-up scores s_1 <= ... <= s_m accepts score >= s_j, where
  j = floor((1 - target_tpr) * m) + 1 (1-based): the largest threshold that
  accepts at least target_tpr of its warm-up utterances.

  Args:
    scores: [W] each warm-up utterance's score against its own user.
    users: [W] its user.
    num_users: U.
    target_tpr: in (0, 1].

  Returns:
    float [U] thresholds (accept when score >= threshold).
  """
  if not 0.0 < target_tpr <= 1.0:
    raise ValueError(f'target_tpr must lie in (0, 1]; got {target_tpr}.')
  scores, users = np.asarray(scores), np.asarray(users)
  out = np.zeros(num_users)
  for u in range(num_users):
    own = np.sort(scores[users == u])
    if own.size == 0:
      raise ValueError(f'User {u} has no warm-up utterance.')
    out[u] = own[int(np.floor((1.0 - target_tpr) * own.size + 1e-9))]
  return out


def per_user_operating_point(seen_scores: np.ndarray, seen_users: np.ndarray,
                             unseen_scores: np.ndarray,
                             thresholds: np.ndarray) -> dict[str, float]:
  """TPR and FAR when every user applies its own warm-up threshold."""
  seen_scores = np.asarray(seen_scores)
  accept_seen = seen_scores >= thresholds[None]
  own = np.zeros(seen_scores.shape, bool)
  own[np.arange(len(seen_users)), np.asarray(seen_users)] = True
  accept_unseen = np.asarray(unseen_scores) >= thresholds[None]
  impostor_accepts = accept_seen[~own].sum() + accept_unseen.sum()
  impostor_trials = (~own).sum() + accept_unseen.size
  return {'tpr': float(accept_seen[own].mean()),
          'far': float(impostor_accepts / impostor_trials),
          'far_seen_impostors': float(accept_seen[~own].mean()),
          'far_unseen_impostors': float(accept_unseen.mean())}


def verification_metrics(trials: dict[str, np.ndarray],
                         fars=(0.01, 0.1)) -> dict[str, float]:
  """EER and TPR at each FAR, over all impostors and per impostor kind."""
  out = {}
  for name, key in (('', 'impostor'), ('seen_', 'impostor_seen'),
                    ('unseen_', 'impostor_unseen')):
    out[f'{name}eer'] = equal_error_rate(trials['genuine'], trials[key])
    for far in fars:
      out[f'{name}tpr_at_far{far:g}'] = tpr_at_far(trials['genuine'],
                                                    trials[key], far)
  out['num_genuine_trials'] = int(trials['genuine'].size)
  out['num_impostor_trials'] = int(trials['impostor'].size)
  return out
