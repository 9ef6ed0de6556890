"""Tests of the meta-learners against hand-derived gradients and references.

The MAML tests use a one-weight linear regression, w -> w * a, with squared
loss, where everything has a closed form. Support loss over (a_i, b_i):

  S(w) = mean_i (w a_i - b_i)^2,  S'(w) = 2 (w A - B),  S''(w) = 2 A,
  with A = mean a_i^2, B = mean a_i b_i; likewise Q, C, D on the query.

Two inner SGD steps with rate r: w1 = w - r S'(w) = (1 - 2 r A) w + 2 r B and
w2 = (1 - 2 r A) w1 + 2 r B, so dw2/dw = (1 - 2 r A)^2 and

  MAML:     dQ(w2)/dw = (1 - 2 r A)^2 * 2 (w2 C - D)
  FO-MAML:  the inner gradients are constants, dw2/dw = 1: 2 (w2 C - D)

With one step and a learned rate r (Meta-SGD), dQ(w1)/dr = -S'(w) Q'(w1).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from few_shot import learner
from few_shot import maml
from few_shot import meta_learners
from few_shot import protonets
from few_shot import reptile
from ondevice import models


def regression_loss(params, model_state, batch, rng):
  """Squared error of pred = classifier/kernel * body/kernel * x."""
  del rng
  pred = batch['x'] * params['body']['kernel'] * params['classifier']['kernel']
  err = jnp.square(pred - batch['y']) * batch['mask']
  count = jnp.sum(batch['mask'])
  return jnp.sum(err) / count, ({'loss_sum': jnp.sum(err), 'correct': 0.0,
                                 'count': count}, model_state)


def _task(a, b, c, d):
  batch = lambda x, y: {'x': jnp.asarray(x, jnp.float32),
                        'y': jnp.asarray(y, jnp.float32),
                        'mask': jnp.ones(len(x), jnp.float32)}
  return {'support': batch(a, b), 'query': batch(c, d)}


A_SUP, B_SUP = np.array([1.0, 2.0]), np.array([0.5, -1.0])
C_QRY, D_QRY = np.array([1.5, -0.5, 1.0]), np.array([2.0, 0.0, 1.0])
PARAMS = {'body': {'kernel': jnp.array(1.0)},
          'classifier': {'kernel': jnp.array(0.7)}}
ONLY_HEAD = ['classifier/kernel']  # The body weight (1.0) stays fixed.


def _closed_form(w, r, steps):
  a, b = np.mean(A_SUP ** 2), np.mean(A_SUP * B_SUP)
  c, d = np.mean(C_QRY ** 2), np.mean(C_QRY * D_QRY)
  adapted = w
  for _ in range(steps):
    adapted = adapted - r * 2 * (adapted * a - b)
  query_grad = 2 * (adapted * c - d)
  return adapted, query_grad, (1 - 2 * r * a) ** steps * query_grad


def test_maml_and_fomaml_match_the_hand_derived_meta_gradient():
  task = _task(A_SUP, B_SUP, C_QRY, D_QRY)
  _, fo_grad, so_grad = _closed_form(0.7, 0.1, steps=2)
  for first_order, expected in ((False, so_grad), (True, fo_grad)):
    learn = maml.gradient_meta_learner(
        regression_loss, optax.sgd(0.5), inner_lr=0.1, inner_steps=2,
        first_order=first_order, outer_trainable=ONLY_HEAD)
    # One outer SGD step on one task: w <- w - 0.5 * meta-gradient.
    new, _ = learn.apply(learn.init(PARAMS),
                         jax.tree.map(lambda x: x[None], task),
                         jax.random.key(0))
    np.testing.assert_allclose(new.params['classifier']['kernel'],
                               0.7 - 0.5 * expected, rtol=1e-5)
    assert new.params['body']['kernel'] == 1.0
  assert not np.isclose(fo_grad, so_grad)


def test_meta_sgd_learns_the_inner_rate_with_the_hand_derived_gradient():
  task = _task(A_SUP, B_SUP, C_QRY, D_QRY)
  adapted, query_grad, so_grad = _closed_form(0.7, 0.1, steps=1)
  support_grad = 2 * (0.7 * np.mean(A_SUP ** 2) - np.mean(A_SUP * B_SUP))
  learn = maml.meta_sgd(regression_loss, optax.sgd(1.0), inner_lr=0.1,
                        inner_steps=1, inner_trainable=ONLY_HEAD,
                        outer_trainable=ONLY_HEAD)
  state = learn.init(PARAMS)
  grads, _ = jax.jit(learn.task_gradient)(state, task, jax.random.key(0))
  np.testing.assert_allclose(grads['params']['classifier/kernel'], so_grad,
                             rtol=1e-5)
  np.testing.assert_allclose(grads['inner_lr']['classifier/kernel'],
                             -support_grad * query_grad, rtol=1e-5)
  adapted_tree = jax.jit(learn.adapt)(state, task['support'],
                                      jax.random.key(0))
  np.testing.assert_allclose(adapted_tree['classifier']['kernel'], adapted,
                             rtol=1e-5)


def test_anil_adapts_the_head_only_but_meta_trains_the_body():
  task = _task(A_SUP, B_SUP, C_QRY, D_QRY)
  learn = maml.anil(regression_loss, optax.sgd(0.1), inner_lr=0.1,
                    inner_steps=1)
  state = learn.init(PARAMS)
  adapted = jax.jit(learn.adapt)(state, task['support'], jax.random.key(0))
  assert adapted['body']['kernel'] == 1.0
  assert adapted['classifier']['kernel'] != 0.7
  grads, _ = jax.jit(learn.task_gradient)(state, task, jax.random.key(0))

  def reference(u, v):  # Plain JAX: one head step, then the query loss.
    loss = lambda p, batch: regression_loss(p, {}, batch, None)[0]
    params = {'body': {'kernel': u}, 'classifier': {'kernel': v}}
    head_grad = jax.grad(lambda vv: loss(
        {'body': {'kernel': u}, 'classifier': {'kernel': vv}},
        task['support']))(v)
    params['classifier']['kernel'] = v - 0.1 * head_grad
    return loss(params, task['query'])

  ref_u, ref_v = jax.jit(jax.grad(reference, argnums=(0, 1)))(1.0, 0.7)
  np.testing.assert_allclose(grads['params']['body/kernel'], ref_u, rtol=1e-5)
  np.testing.assert_allclose(grads['params']['classifier/kernel'], ref_v,
                             rtol=1e-5)


def test_reptile_moves_the_init_towards_the_adapted_weights():
  tasks = [_task(A_SUP, B_SUP, C_QRY, D_QRY),
           _task(-A_SUP, B_SUP, C_QRY, -D_QRY)]
  learn = reptile.reptile(regression_loss, optax.sgd(0.25),
                          inner_optimizer=optax.sgd(0.05), inner_steps=3)
  state = learn.init(PARAMS)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *tasks)
  new, _ = learn.apply(state, stacked, jax.random.key(0))
  grad = jax.jit(jax.grad(lambda p, b: regression_loss(p, {}, b, None)[0]))
  moves = []
  for task in tasks:  # Reference: three SGD steps on support + query.
    batch = {k: jnp.concatenate([task['support'][k], task['query'][k]])
             for k in ('x', 'y', 'mask')}
    params = PARAMS
    for _ in range(3):
      grads = grad(params, batch)
      params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    moves.append(jax.tree.map(jnp.subtract, params, PARAMS))
  expected = jax.tree.map(lambda p, m1, m2: p + 0.25 * (m1 + m2) / 2, PARAMS,
                          *moves)
  for path in ('body', 'classifier'):
    np.testing.assert_allclose(new.params[path]['kernel'],
                               expected[path]['kernel'], rtol=1e-5)


def test_vmapped_maml_equals_a_python_loop_over_tasks():
  rng = np.random.default_rng(0)
  tasks = _task(*rng.normal(size=(4, 4, 5)))
  learn = maml.maml(regression_loss, optax.sgd(0.1), inner_lr=0.05,
                    inner_steps=2)
  state = learn.init(PARAMS)
  vmapped, v_metrics = learn.apply(state, tasks, jax.random.key(1))
  looped, l_metrics = learner.python_loop_apply(learn)(
      state, tasks, jax.random.key(1))
  for a, b in zip(jax.tree.leaves(vmapped.params),
                  jax.tree.leaves(looped.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(v_metrics['loss'], l_metrics['loss'], rtol=1e-5)
  assert int(vmapped.step) == 1


def test_protonet_logits_are_negative_squared_distances_to_class_means():
  rng = np.random.default_rng(0)
  support = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 2, 0, 2, 2, 1])
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)  # Class 1 has no support.
  query = rng.normal(size=(4, 3)).astype(np.float32)

  @jax.jit
  def compute(support, labels, mask, query):
    protos, counts = protonets.prototypes(support, labels, mask, 3)
    logits = protonets.prototype_logits(query, protos, counts)
    # The head `adapt` writes: W = 2 C^T, b = -||c||^2 (absent: excluded).
    bias = jnp.where(counts > 0, -jnp.sum(protos ** 2, -1),
                     protonets.ABSENT_LOGIT)
    return logits, query @ (2.0 * protos.T) + bias

  logits, head_logits = map(np.asarray, compute(support, labels, mask, query))
  means = {c: support[(labels == c) & (mask > 0)].mean(0) for c in (0, 2)}
  for c in (0, 2):
    np.testing.assert_allclose(
        logits[:, c], -np.sum((query - means[c]) ** 2, axis=1), rtol=1e-5)
  assert (logits[:, 1] == protonets.ABSENT_LOGIT).all()
  # The prototype head gives the same softmax: the -||f||^2 term it leaves
  # out is shared by every class.
  softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(
      z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  np.testing.assert_allclose(softmax(head_logits), softmax(logits), atol=1e-5)


# Every learner of the table, built from its config block, takes an outer step.


def _class_tasks(num_tasks=2, per_class=2, num_classes=3):
  rng = np.random.default_rng(0)
  means = rng.normal(size=(num_classes, 5, 4))
  y = np.tile(np.repeat(np.arange(num_classes), per_class), (num_tasks, 1))
  batch = lambda: {
      'x': jnp.asarray(means[y] + 0.1 * rng.normal(size=y.shape + (5, 4)),
                       jnp.float32),
      'y': jnp.asarray(y, jnp.int32), 'mask': jnp.ones(y.shape, jnp.float32)}
  return {'support': batch(), 'query': batch()}


@pytest.mark.parametrize('name', sorted(meta_learners.META_LEARNERS))
def test_every_meta_learner_builds_from_its_config_block_and_steps(name):
  cfg = ml_collections.ConfigDict(meta_learners.default_configs(
      inner_lr=0.1, inner_steps=1, outer_lr=0.01, step_size=0.5))
  model = models.build_model('mlp', 3, hidden=(8,), norm='none')
  params = model.init(jax.random.key(0), jnp.zeros((1, 5, 4)))['params']
  learn = meta_learners.from_config(cfg, name, model, num_classes=3,
                                    key='config.meta')
  state = learn.init(params)
  new, metrics = learn.apply(state, _class_tasks(), jax.random.key(1))
  assert int(new.step) == 1
  assert np.isfinite(float(metrics['loss']))
  # The hidden layer's kernel is meta-trained by every learner.
  before, after = (np.asarray(s.params['hidden1']['kernel'])
                   for s in (state, new))
  assert not np.allclose(before, after)
  per_task = learn.evaluate(new, _class_tasks(), jax.random.key(2))
  assert per_task['accuracy'].shape == (2,)


def test_config_blocks_hold_each_learners_own_hyperparameters():
  cfg = meta_learners.default_configs(inner_lr=0.2, step_size=0.3,
                                      outer_lr=1e-4)
  assert set(cfg) == set(meta_learners.META_LEARNERS)
  assert cfg['reptile'].to_dict() == {'inner_lr': 0.2, 'inner_steps': 1,
                                      'eval_inner_steps': None,
                                      'step_size': 0.3}
  assert cfg['protonet'].to_dict() == {'outer_lr': 1e-4}
  assert cfg['meta_sgd'].outer_lr == 1e-4 and 'step_size' not in cfg['maml']


def test_unknown_learner_and_unknown_argument_name_the_key():
  cfg = ml_collections.ConfigDict(meta_learners.default_configs())
  model = models.build_model('mlp', 3, hidden=(8,), norm='none')
  with pytest.raises(ValueError, match=r"config.meta.names has 'mamll'.*"
                     r"'anil', 'fomaml', 'maml', 'meta_sgd', 'protonet'"):
    meta_learners.from_config(cfg, 'mamll', model, num_classes=3,
                              key='config.meta')
  cfg.protonet.inner_lr = 0.1
  with pytest.raises(ValueError, match=r"config.meta.protonet has unknown "
                     r"arguments \['inner_lr'\]"):
    meta_learners.from_config(cfg, 'protonet', model, num_classes=3,
                              key='config.meta')
