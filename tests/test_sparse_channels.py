"""Partial-channel updates: channel choice and the masked optimiser."""
import jax
import numpy as np
import optax
import pytest

from ondevice import cost
from ondevice import train
from sparse_updates import channel_masks
from sparse_updates import rules


def _params():
  # Column c of the kernel has L2 norm 1 + c % 5 for c = 0..9, with a tie
  # (columns 3 and 8 both have norm 4).
  norms = 1.0 + np.arange(10) % 5
  kernel = np.zeros((4, 10), np.float32)
  kernel[0] = norms
  return {'dense': {'kernel': kernel, 'bias': np.zeros(10, np.float32)},
          'head': {'kernel': np.ones((10, 2), np.float32),
                   'bias': np.zeros(2, np.float32)}}


def test_magnitude_keeps_the_largest_channels_and_the_bias_follows():
  scheme = [('dense/.*', 0.3), ('head/.*', 'train')]
  masks = channel_masks.update_masks(_params(), scheme)
  # Norms: [1 2 3 4 5 1 2 3 4 5]; the 3 largest are 5, 5, 4; the tie at 4
  # (channels 3, 8) goes to the lower index.
  np.testing.assert_array_equal(np.flatnonzero(masks['dense/kernel']),
                                [3, 4, 9])
  np.testing.assert_array_equal(masks['dense/bias'], masks['dense/kernel'])
  assert set(masks) == {'dense/kernel', 'dense/bias'}


def test_random_channels_need_a_key_and_are_reproducible():
  scheme = [('dense/kernel', 0.5), ('.*', None)]
  with pytest.raises(ValueError, match='explicit PRNG key'):
    channel_masks.update_masks(_params(), scheme, method='random')
  a = channel_masks.update_masks(_params(), scheme, 'random',
                                 jax.random.key(3))
  b = channel_masks.update_masks(_params(), scheme, 'random',
                                 jax.random.key(3))
  np.testing.assert_array_equal(a['dense/kernel'], b['dense/kernel'])
  assert int(np.sum(a['dense/kernel'])) == 5
  with pytest.raises(ValueError, match='choose one of'):
    channel_masks.update_masks(_params(), scheme, method='gradient')


@pytest.mark.parametrize('make_opt', [
    lambda: optax.adamw(0.1, weight_decay=0.5),  # Decay must not leak.
    lambda: optax.sgd(0.1, momentum=0.9),
])
def test_masked_channels_never_move(make_opt):
  params = _params()
  scheme = [('dense/kernel', 0.3), ('head/.*', 'train'), ('.*', None)]
  masks = channel_masks.update_masks(params, scheme)
  paths = rules.trainable_paths(params, scheme)
  opt = channel_masks.masked_optimizer(make_opt(), masks)

  def loss_fn(p, model_state, batch, rng):
    del rng
    h = jax.nn.relu(batch['x'] @ p['dense']['kernel'] + p['dense']['bias'])
    logits = h @ p['head']['kernel'] + p['head']['bias']
    sums = train.classification_metrics(logits, batch['y'], batch['mask'])
    loss = train.masked_mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y']), batch['mask'])
    return loss, (sums, model_state)

  state = train.state_from_params(params, {}, opt, paths)
  step = jax.jit(train.make_train_step(loss_fn, opt, paths))
  rng = np.random.default_rng(0)
  for i in range(3):
    x = rng.normal(size=(8, 4)).astype(np.float32)
    batch = {'x': x, 'y': (x[:, 1] > 0).astype(np.int32),
             'mask': np.ones(8, np.float32)}
    state, _ = step(state, batch, jax.random.key(i))
  before = params['dense']['kernel']
  after = np.asarray(state.params['dense']['kernel'])
  chosen = np.asarray(masks['dense/kernel'])
  np.testing.assert_array_equal(after[:, ~chosen], before[:, ~chosen])
  assert not np.allclose(after[:, chosen], before[:, chosen])
  np.testing.assert_array_equal(state.params['dense']['bias'], 0.0)


def test_mask_errors_name_the_fix():
  params = _params()
  masks = {'dense/kernel': np.ones(10, bool)}
  opt = channel_masks.masked_optimizer(optax.sgd(0.1), masks)
  grads = {'head/kernel': np.ones((10, 2), np.float32)}
  with pytest.raises(ValueError, match='not trainable leaves'):
    opt.update(grads, opt.init(grads))
  wrong = channel_masks.masked_optimizer(optax.sgd(0.1),
                                         {'head/kernel': np.ones(3, bool)})
  with pytest.raises(ValueError, match='2 output channels'):
    wrong.update(grads, wrong.init(grads))
  del params


def test_bytes_sent_count_only_the_chosen_channels():
  params = _params()
  scheme = [('dense/kernel', 0.3), ('head/.*', 'train'), ('.*', None)]
  masks = channel_masks.update_masks(params, scheme)
  paths = rules.trainable_paths(params, scheme)
  # 3 of 10 kernel columns x 4 rows, plus the 10x2 + 2 head, float32.
  assert cost.bytes_of_trainable(params, paths, masks) == (12 + 22) * 4
  assert cost.bytes_of_trainable(params, paths) == (40 + 22) * 4
