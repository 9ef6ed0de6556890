"""Anti-forgetting regularisers, each a loss wrapper `LossFn -> LossFn`.

A device that keeps learning from its user must keep what the pre-trained
model knew about everybody else. Each regulariser adds one term to any task
loss (`ondevice.train.LossFn`), so that it composes with pseudo-labelling,
quantised training and sparse updates alike:

  distillation  Learning without Forgetting (Li & Hoiem, ECCV 2016,
                arXiv:1606.09282): keep the outputs of the pre-trained model
                on the new data, weight * T^2 * KL(p_teacher^T || p_student^T)
                with softmax temperature T (Hinton et al. 2015's scaling).
                Rows where batch['distill_mask'] is 1 (default: the task
                mask) are distilled, so unlabelled clips can be distilled too.
  l2_sp         L2-SP (Li, Grandvalet & Davoine, ICML 2018,
                arXiv:1802.01483): alpha / 2 * sum (w - w0)^2 toward the
                pre-trained starting point w0 rather than toward zero.
  ewc           Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017,
                arXiv:1612.00796): lam / 2 * sum F (w - w0)^2 with a diagonal
                Fisher information F estimated on the pre-training data.

Every term is zero at the pre-trained point. The wrapped loss reports the
term's value in its metrics as '<name>_term'.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ondevice import train

PyTree = Any
# (params, model_state, x, rng) -> logits; e.g. `objectives.logits_fn(model)`.
LogitsFn = Callable[[PyTree, PyTree, jax.Array, jax.Array], jax.Array]
REGULARIZERS = ('none', 'distillation', 'l2_sp', 'ewc')


def _check_same_tree(params: PyTree, other: PyTree, what: str) -> None:
  if jax.tree.structure(params) != jax.tree.structure(other):
    raise ValueError(f'{what} must have the structure of the params; build it '
                     'from the same model (e.g. the pre-trained params).')


def l2_sp_penalty(params: PyTree, reference: PyTree, alpha: float
                  ) -> jax.Array:
  """alpha / 2 * sum over every weight of (w - w0)^2."""
  sq = jax.tree.map(lambda w, w0: jnp.sum(jnp.square(w - w0)), params,
                    reference)
  return 0.5 * alpha * sum(jax.tree.leaves(sq))


def ewc_penalty(params: PyTree, reference: PyTree, fisher: PyTree,
                lam: float) -> jax.Array:
  """lam / 2 * sum over every weight of F * (w - w0)^2."""
  sq = jax.tree.map(lambda w, w0, f: jnp.sum(f * jnp.square(w - w0)), params,
                    reference, fisher)
  return 0.5 * lam * sum(jax.tree.leaves(sq))


def distillation_penalty(student_logits: jax.Array, teacher_logits: jax.Array,
                         mask: jax.Array, temperature: float) -> jax.Array:
  """T^2 * masked mean over rows of KL(softmax(t / T) || softmax(s / T))."""
  t_logp = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return temperature ** 2 * train.masked_mean(kl, mask)


def _add_term(loss_fn: train.LossFn, name: str, term_fn) -> train.LossFn:
  """loss_fn plus term_fn(params, model_state, batch, rng)."""
  def wrapped(params, model_state, batch, rng):
    loss, (sums, new_state) = loss_fn(params, model_state, batch, rng)
    term = term_fn(params, model_state, batch, rng)
    sums = dict(sums)
    sums[f'{name}_term'] = term
    return loss + term, (sums, new_state)
  return wrapped


def with_l2_sp(loss_fn: train.LossFn, reference: PyTree, alpha: float
               ) -> train.LossFn:
  """Adds `l2_sp_penalty` toward `reference` (the pre-trained params)."""
  if alpha < 0:
    raise ValueError(f'L2-SP alpha must be >= 0; got {alpha}.')
  reference = jax.tree.map(jnp.asarray, reference)
  def term(params, model_state, batch, rng):
    del model_state, batch, rng
    return l2_sp_penalty(params, reference, alpha)
  return _add_term(loss_fn, 'l2_sp', term)


def with_ewc(loss_fn: train.LossFn, reference: PyTree, fisher: PyTree,
             lam: float) -> train.LossFn:
  """Adds `ewc_penalty`; `fisher` from `fisher_diagonal` at `reference`."""
  if lam < 0:
    raise ValueError(f'EWC lambda must be >= 0; got {lam}.')
  _check_same_tree(reference, fisher, 'The Fisher estimate')
  reference = jax.tree.map(jnp.asarray, reference)
  fisher = jax.tree.map(jnp.asarray, fisher)
  def term(params, model_state, batch, rng):
    del model_state, batch, rng
    return ewc_penalty(params, reference, fisher, lam)
  return _add_term(loss_fn, 'ewc', term)


def with_distillation(loss_fn: train.LossFn, logits_fn: LogitsFn,
                      teacher_params: PyTree, teacher_state: PyTree,
                      temperature: float = 2.0, weight: float = 1.0,
                      min_confidence: float = 0.0) -> train.LossFn:
  """Adds LwF distillation to the fixed teacher (the pre-trained model).

  Args:
    loss_fn: task loss.
    logits_fn: computes logits of student and teacher alike.
    teacher_params: the pre-trained params (not trained).
    teacher_state: the teacher's model state (e.g. batch statistics).
    temperature: softmax temperature T (Li & Hoiem use 2).
    weight: multiplies the term (their lambda_o).
    min_confidence: rows where the teacher's top softmax probability (at
      T = 1) is below this are not distilled: the student keeps what the
      teacher knew, and may learn where it never knew (e.g. a new noise).
      0 distils every row, as Li & Hoiem.
  """
  if temperature <= 0 or weight < 0 or not 0 <= min_confidence <= 1:
    raise ValueError(f'Distillation needs temperature > 0, weight >= 0 and '
                     f'min_confidence in [0, 1]; got {temperature}, {weight} '
                     f'and {min_confidence}.')
  teacher_params = jax.tree.map(jnp.asarray, teacher_params)
  def term(params, model_state, batch, rng):
    mask = batch.get('distill_mask', batch['mask'])
    teacher = jax.lax.stop_gradient(
        logits_fn(teacher_params, teacher_state, batch['x'], rng))
    if min_confidence > 0:
      sure = jnp.max(jax.nn.softmax(teacher, axis=-1), axis=-1)
      mask = mask * (sure >= min_confidence).astype(mask.dtype)
    student = logits_fn(params, model_state, batch['x'], rng)
    return weight * distillation_penalty(student, teacher, mask, temperature)
  return _add_term(loss_fn, 'distillation', term)


def fisher_diagonal(logits_fn: LogitsFn, params: PyTree, model_state: PyTree,
                    x: jax.Array, key: jax.Array, labels: jax.Array | None = None,
                    batch_size: int = 64) -> PyTree:
  """Diagonal Fisher information E_x E_y~p(y|x) [(d log p(y|x) / dw)^2].

  Args:
    logits_fn: the model's logits.
    params: where the Fisher is evaluated (the pre-trained params).
    model_state: model state for `logits_fn`.
    x: inputs [N, ...] from the pre-training distribution.
    key: PRNG key for sampling y from the model's predictive distribution
      (the true Fisher, as Kirkpatrick et al.).
    labels: if given, use these y instead: the "empirical Fisher".
    batch_size: examples per vmapped chunk (bounds memory).

  Returns:
    A tree like `params` with the mean squared per-example gradient.
  """
  n = len(x)
  if n == 0:
    raise ValueError('fisher_diagonal needs at least one example.')

  def log_prob(p, xi, yi, rng):
    logits = logits_fn(p, model_state, xi[None], rng)[0]
    return jax.nn.log_softmax(logits)[yi]

  @jax.jit
  def chunk_sum(xs, ys, valid, rng):
    grads = jax.vmap(jax.grad(log_prob), in_axes=(None, 0, 0, None))(
        params, xs, ys, rng)
    return jax.tree.map(
        lambda g: jnp.tensordot(valid, jnp.square(g), axes=1), grads)

  @jax.jit
  def sample_labels(xs, rng):
    return jax.random.categorical(rng, logits_fn(params, model_state, xs, rng))

  total = jax.tree.map(jnp.zeros_like, params)
  for index, start in enumerate(range(0, n, batch_size)):
    xs = np.asarray(x[start:start + batch_size])
    pad = batch_size - len(xs)
    valid = np.concatenate([np.ones(len(xs)), np.zeros(pad)]).astype(
        np.float32)
    xs = np.concatenate([xs, np.zeros((pad,) + xs.shape[1:], xs.dtype)])
    chunk_key = jax.random.fold_in(key, index)
    if labels is None:
      ys = sample_labels(xs, chunk_key)
    else:
      ys = np.asarray(labels[start:start + batch_size])
      ys = np.concatenate([ys, np.zeros(pad, ys.dtype)])
    total = jax.tree.map(jnp.add, total, chunk_sum(xs, ys, valid, chunk_key))
  return jax.tree.map(lambda t: t / n, total)


def build(name: str, loss_fn: train.LossFn, *, reference: PyTree = None,
          reference_state: PyTree = None, logits_fn: LogitsFn | None = None,
          fisher: PyTree = None, strength: float = 1.0,
          temperature: float = 2.0,
          min_confidence: float = 0.0) -> train.LossFn:
  """Wraps `loss_fn` with the regulariser called `name` (see REGULARIZERS).

  `strength` is the weight (distillation), alpha (l2_sp) or lambda (ewc);
  `temperature` and `min_confidence` concern distillation only.
  """
  if name not in REGULARIZERS:
    raise ValueError(f'Unknown regulariser {name!r}; set config.regularizer '
                     f'to one of {REGULARIZERS}.')
  if name == 'none':
    return loss_fn
  if reference is None:
    raise ValueError(f'Regulariser {name!r} needs reference= the pre-trained '
                     'params.')
  if name == 'l2_sp':
    return with_l2_sp(loss_fn, reference, strength)
  if name == 'ewc':
    if fisher is None:
      raise ValueError("Regulariser 'ewc' needs fisher= (see "
                       'fisher_diagonal).')
    return with_ewc(loss_fn, reference, fisher, strength)
  if logits_fn is None:
    raise ValueError("Regulariser 'distillation' needs logits_fn=.")
  return with_distillation(loss_fn, logits_fn, reference,
                           reference_state or {}, temperature, strength,
                           min_confidence)
