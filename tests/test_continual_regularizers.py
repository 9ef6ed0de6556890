"""Regulariser terms against hand computations, and their gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from continual import objectives
from continual import regularizers
from ondevice import models
from ondevice import train

PARAMS = {'a': jnp.array([1.0, 2.0]), 'b': {'c': jnp.array([[3.0]])}}
REF = {'a': jnp.array([0.0, 1.0]), 'b': {'c': jnp.array([[1.0]])}}
FISHER = {'a': jnp.array([2.0, 3.0]), 'b': {'c': jnp.array([[0.5]])}}


def _base_loss(params, model_state, batch, rng):
  """A quadratic task loss with the LossFn contract."""
  del rng
  loss = jnp.sum(params['a'] * batch['x'][0, :2]) + params['b']['c'][0, 0] ** 2
  sums = {'loss_sum': loss, 'correct': jnp.zeros(()), 'count': jnp.ones(())}
  return loss, (sums, model_state)


BATCH = {'x': jnp.array([[0.5, -1.0]]), 'y': jnp.zeros(1, jnp.int32),
         'mask': jnp.ones(1)}


def test_l2_sp_term_by_hand():
  # alpha / 2 * ((1-0)^2 + (2-1)^2 + (3-1)^2) = 0.25 * 6.
  assert float(regularizers.l2_sp_penalty(PARAMS, REF, 0.5)) == pytest.approx(
      1.5)
  assert float(regularizers.l2_sp_penalty(REF, REF, 0.5)) == 0.0


def test_ewc_term_by_hand():
  # lam / 2 * (2 * 1 + 3 * 1 + 0.5 * 4) = 1 * 7.
  assert float(regularizers.ewc_penalty(PARAMS, REF, FISHER, 2.0)
               ) == pytest.approx(7.0)
  assert float(regularizers.ewc_penalty(REF, REF, FISHER, 2.0)) == 0.0


def test_distillation_term_by_hand():
  # Teacher logits (0, ln 3) at T = 2: p = (1, sqrt 3) / (1 + sqrt 3)
  # = (0.3660254, 0.6339746); the student (0, 0) gives q = (1/2, 1/2).
  # KL(p || q) = 0.3660254 ln(0.7320508) + 0.6339746 ln(1.2679492)
  #            = -0.1141653 + 0.1505061 = 0.0363408; times T^2 = 0.1453631.
  teacher = jnp.array([[0.0, np.log(3.0)], [5.0, -5.0]])
  student = jnp.array([[0.0, 0.0], [-9.0, 9.0]])
  mask = jnp.array([1.0, 0.0])  # The second row is padding.
  value = regularizers.distillation_penalty(student, teacher, mask, 2.0)
  assert float(value) == pytest.approx(0.1453631, rel=1e-5)
  assert float(regularizers.distillation_penalty(
      teacher, teacher, jnp.ones(2), 2.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('name', ['l2_sp', 'ewc'])
def test_wrapped_gradient_is_base_plus_term(name):
  if name == 'l2_sp':
    wrapped = regularizers.with_l2_sp(_base_loss, REF, 0.5)
    # d/dw alpha/2 (w - w0)^2 = alpha (w - w0).
    term_grad = jax.tree.map(lambda w, w0: 0.5 * (w - w0), PARAMS, REF)
  else:
    wrapped = regularizers.with_ewc(_base_loss, REF, FISHER, 2.0)
    term_grad = jax.tree.map(lambda w, w0, f: 2.0 * f * (w - w0), PARAMS, REF,
                             FISHER)
  grad = lambda fn: jax.grad(lambda p: fn(p, {}, BATCH, None)[0])(PARAMS)
  expected = jax.tree.map(jnp.add, grad(_base_loss), term_grad)
  for got, want in zip(jax.tree.leaves(grad(wrapped)),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  loss, (sums, _) = wrapped(PARAMS, {}, BATCH, None)
  base, _ = _base_loss(PARAMS, {}, BATCH, None)
  assert float(loss - base) == pytest.approx(float(sums[f'{name}_term']))
  at_ref, (sums, _) = wrapped(REF, {}, BATCH, None)
  assert float(sums[f'{name}_term']) == 0.0
  assert float(at_ref) == pytest.approx(float(_base_loss(REF, {}, BATCH,
                                                         None)[0]))


def _mlp():
  model = models.build_model('mlp', 3, hidden=(4,), norm='batch')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 5)))
  params = variables.pop('params')
  return model, params, dict(variables)


def test_distillation_wrapper_gradient_and_zero_at_teacher():
  model, teacher, state = _mlp()
  logits = objectives.logits_fn(model)
  base = objectives.frozen_stats_loss(model)
  wrapped = regularizers.with_distillation(base, logits, teacher, state,
                                           temperature=2.0, weight=0.7)
  x = jax.random.normal(jax.random.key(1), (6, 5))
  batch = {'x': x, 'y': jnp.array([0, 1, 2, 0, 1, 2]),
           'mask': jnp.array([1., 1., 1., 0., 0., 0.]),
           'distill_mask': jnp.ones(6)}
  student = jax.tree.map(lambda w: w + 0.3, teacher)

  def term(p):
    return 0.7 * regularizers.distillation_penalty(
        logits(p, state, x, None), logits(teacher, state, x, None),
        batch['distill_mask'], 2.0)
  loss_of = lambda fn: (lambda p: fn(p, state, batch, None)[0])
  got = jax.jit(jax.grad(loss_of(wrapped)))(student)
  want = jax.jit(lambda p: jax.tree.map(
      jnp.add, jax.grad(loss_of(base))(p), jax.grad(term)(p)))(student)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  # All six rows are distilled, not only the three labelled ones.
  terms = jax.jit(lambda p: (wrapped(p, state, batch, None)[1][0]
                             ['distillation_term'], term(p)))
  got_term, want_term = terms(student)
  assert float(got_term) == pytest.approx(float(want_term), rel=1e-6)
  assert float(terms(teacher)[0]) == pytest.approx(0.0, abs=1e-6)


def test_empirical_fisher_matches_per_example_loop():
  model, params, state = _mlp()
  logits = objectives.logits_fn(model)
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 5)))
  y = np.array([0, 2, 1, 1, 0])
  fisher = regularizers.fisher_diagonal(logits, params, state, x,
                                        jax.random.key(0), labels=y,
                                        batch_size=2)
  grad = jax.jit(jax.grad(lambda p, xi, yi: jax.nn.log_softmax(
      logits(p, state, xi[None], None)[0])[yi]))
  total = jax.tree.map(jnp.zeros_like, params)
  for xi, yi in zip(x, y):
    total = jax.tree.map(lambda t, gi: t + gi ** 2, total,
                         grad(params, xi, yi))
  for got, want in zip(jax.tree.leaves(fisher), jax.tree.leaves(total)):
    np.testing.assert_allclose(got, np.asarray(want) / 5, rtol=1e-5,
                               atol=1e-9)


def test_sampled_fisher_converges_to_the_expectation():
  """Sampling y ~ p(y|x) estimates E_y[g^2]; tolerance from Var(g^2)."""
  model, params, state = _mlp()
  logits = objectives.logits_fn(model)
  x1 = np.asarray(jax.random.normal(jax.random.key(3), (1, 5)))
  probs = jax.nn.softmax(logits(params, state, x1, None)[0])
  grad = jax.jit(jax.grad(lambda p, c: jax.nn.log_softmax(
      logits(p, state, x1, None)[0])[c]))
  per_class = [grad(params, c) for c in range(3)]
  sq = [np.concatenate([np.ravel(l) ** 2 for l in jax.tree.leaves(g)])
        for g in per_class]
  mean = sum(float(p) * s for p, s in zip(probs, sq))
  var = sum(float(p) * s ** 2 for p, s in zip(probs, sq)) - mean ** 2
  n = 2048
  fisher = regularizers.fisher_diagonal(logits, params, state,
                                        np.repeat(x1, n, axis=0),
                                        jax.random.key(4), batch_size=256)
  got = np.concatenate([np.ravel(l) for l in jax.tree.leaves(fisher)])
  # Each element is a mean of n i.i.d. draws: 5 standard errors.
  np.testing.assert_array_less(np.abs(got - mean),
                               5 * np.sqrt(var / n) + 1e-9)


def test_build_by_name_and_errors():
  assert regularizers.build('none', _base_loss) is _base_loss
  with pytest.raises(ValueError, match='one of'):
    regularizers.build('lwf', _base_loss, reference=REF)
  with pytest.raises(ValueError, match='fisher='):
    regularizers.build('ewc', _base_loss, reference=REF)
  with pytest.raises(ValueError, match='structure'):
    regularizers.with_ewc(_base_loss, REF, {'a': FISHER['a']}, 1.0)
  wrapped = regularizers.build('l2_sp', _base_loss, reference=REF,
                               strength=0.5)
  _, (sums, _) = wrapped(PARAMS, {}, BATCH, None)
  assert float(sums['l2_sp_term']) == pytest.approx(1.5)


def test_wrapped_loss_runs_in_the_pure_train_step():
  model, params, state = _mlp()
  loss = regularizers.with_l2_sp(objectives.frozen_stats_loss(model), params,
                                 1.0)
  opt = optax.sgd(0.1)
  st = train.state_from_params(params, state, opt)
  step = jax.jit(train.make_train_step(loss, opt))
  batch = {'x': jnp.ones((4, 5)), 'y': jnp.array([0, 1, 2, 0]),
           'mask': jnp.ones(4)}
  st, metrics = step(st, batch, jax.random.key(0))
  assert float(metrics['l2_sp_term']) == 0.0  # Evaluated at the start point.
  # Statistics stay frozen: the batch-norm running averages do not move.
  for a, b in zip(jax.tree.leaves(st.model_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_gated_distillation_skips_rows_the_teacher_is_unsure_of():
  linear = lambda p, s, x, rng: x @ p['w']
  teacher = {'w': jnp.eye(3)}
  student = {'w': jnp.eye(3) * 0.5}
  # Row 0: teacher softmax(5, 0, 0) has top probability 0.987 (kept at 0.9);
  # row 1: softmax(0.1, 0, 0) has 0.35 (dropped).
  x = jnp.array([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
  batch = {'x': x, 'y': jnp.zeros(2, jnp.int32), 'mask': jnp.ones(2)}
  zero_loss = lambda p, s, b, r: (0.0, ({'count': jnp.ones(())}, s))
  gated = regularizers.with_distillation(zero_loss, linear, teacher, {},
                                         temperature=1.0, min_confidence=0.9)
  loss, _ = gated(student, {}, batch, None)
  want = regularizers.distillation_penalty(x[:1] @ student['w'],
                                           x[:1] @ teacher['w'], jnp.ones(1),
                                           1.0)
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  with pytest.raises(ValueError, match='min_confidence'):
    regularizers.with_distillation(zero_loss, linear, teacher, {},
                                   min_confidence=1.5)
