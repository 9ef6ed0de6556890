"""Memory / compute / bytes accounting, analytic against compiled.

DS-CNN-S (norm='none', as deployed with batch norm folded) on 98 x 40
log-mel frames: conv0 (10x4, stride 2) gives 49 x 20 x 64 maps, and every
later layer keeps that size, so each activation tensor holds
A = 49 * 20 * 64 = 62,720 values per example (250,880 B in float32).

`ondevice.models` computes depthwise convolutions on CPU as 9 shifted
products (faster on XLA's CPU backend); `lax_dscnn` injects lax's
convolution instead, the form whose working set is a few tensors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ondevice import cost
from ondevice import models
from ondevice import train
from sparse_updates import compact_relu
from sparse_updates import presets
from sparse_updates import rules

A = 49 * 20 * 64            # Values per activation tensor per example.
POOLED = 64 * 4             # Classifier input, float32, per example.


def test_compiled_cost_of_a_matmul():
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  w = jax.ShapeDtypeStruct((128, 32), jnp.float32)
  c = cost.compiled_cost(lambda a, b: a @ b, x, w)
  assert c.flops == 2 * 64 * 128 * 32
  assert c.argument_bytes == (64 * 128 + 128 * 32) * 4
  assert c.output_bytes == 64 * 32 * 4
  assert c.peak_bytes == c.argument_bytes + c.output_bytes + c.temp_bytes


def test_bytes_of_trainable_dscnn_biases():
  model = models.build_model('ds_cnn_s', 12, norm='none')
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 98, 40)))['params']
  paths = rules.trainable_paths(params, presets.get_rules('bias_only'))
  # 9 conv biases of 64, the classifier's 64 x 12 kernel and 12 biases.
  assert cost.bytes_of_trainable(params, paths) == (9 * 64 + 64 * 12 + 12) * 4
  with pytest.raises(ValueError, match='not parameters'):
    cost.bytes_of_trainable(params, ['pw9/bias'])


def _shifted_depthwise(lhs, rhs, window_strides, padding,
                       feature_group_count=1, **kwargs):
  """A stride-1 3x3 depthwise conv as 9 shifted products (else lax's)."""
  if feature_group_count == 1:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding,
        feature_group_count=feature_group_count, **kwargs)
  x = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = lhs.shape[1:3]
  return sum(jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + h, j + w,
                                              x.shape[3])) * rhs[i, j, 0]
             for i in range(3) for j in range(3))


def lax_dscnn(**kwargs):
  return models.build_model('ds_cnn_s', 12, norm='none',
                            conv_general_dilated=jax.lax.conv_general_dilated,
                            **kwargs)


@pytest.fixture(scope='module')
def dscnn():
  model = lax_dscnn()
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 98, 40)))['params']
  return model, shapes


@pytest.mark.parametrize('scheme,bits,expected', [
    # Bias-only: no layer input is needed; each of the 9 ReLUs keeps its
    # mask, plus the pooled classifier input for the head's dW.
    ('bias_only', 32, 9 * A * 4 + POOLED),
    ('bias_only', 1, 9 * A // 8 + POOLED),
    # Full: the 8 convs after conv0 keep their input (conv0's is the data),
    # plus the masks and the pooled input.
    ('full', 32, 8 * A * 4 + 9 * A * 4 + POOLED),
    ('full', 1, 8 * A * 4 + 9 * A // 8 + POOLED),
    # Last 2 layers: pw4's input, one mask (pw4's output), pooled input.
    ('last_k', 1, A * 4 + A // 8 + POOLED),
    ('classifier_only', 1, POOLED),
    # Depthwise as 9 shifted products: a trainable depthwise kernel keeps
    # the 9 shifted slices (A values each) instead of one input.
    ('full_shifted', 32, (4 + 4 * 9) * A * 4 + 9 * A * 4 + POOLED),
    ('bias_only_shifted', 32, 9 * A * 4 + POOLED),
])
def test_analytic_stored_activations_by_hand(dscnn, scheme, bits, expected):
  model, params = dscnn
  if scheme.endswith('_shifted'):
    scheme = scheme[:-len('_shifted')]
    model = models.build_model('ds_cnn_s', 12, norm='none',
                               conv_general_dilated=_shifted_depthwise)
  order = presets.forward_order(model, {'params': params},
                                jnp.zeros((1, 98, 40)))
  kwargs = {'k': 2, 'layer_order': order} if scheme == 'last_k' else {}
  paths = rules.trainable_paths(params, presets.get_rules(scheme, params,
                                                          **kwargs))
  m = cost.analytic_training_memory(model, params, paths, (1, 98, 40),
                                    optimizer_slots=2, relu_mask_bits=bits)
  assert m.activations == expected
  assert m.unknown_primitives == ()
  trainable = cost.bytes_of_trainable(params, paths)
  assert (m.trainable_weights, m.gradients, m.optimizer_state) == (
      trainable, trainable, 2 * trainable)
  assert m.frozen_weights + trainable == cost.bytes_of_tree(params)


@pytest.fixture(scope='module')
def compiled():
  """Compiled and analytic training memory at batch 8, Adam.

  DS-CNN-S cut to 1 block (3 convs) to keep compilation short; the layers
  and activation sizes are those of DS-CNN-S.
  """
  model = lax_dscnn(block_strides=((1, 1),))
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 98, 40)))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  batch_size = 8
  batch = {'x': np.zeros((batch_size, 98, 40), np.float32),
           'y': np.zeros(batch_size, np.int32),
           'mask': np.ones(batch_size, np.float32)}
  opt = optax.adam(1e-3)
  out = {}
  for scheme in ('full', 'bias_only'):
    paths = rules.trainable_paths(params, presets.get_rules(scheme))
    state = train.state_from_params(params, {}, opt, paths)
    for bits in (32, 1):
      loss_fn = train.classification_loss(model)
      if bits == 1:
        loss_fn = compact_relu.with_compact_relu(loss_fn)
      step = train.make_train_step(loss_fn, opt, paths)
      c = cost.compiled_cost(step, state, batch, jax.random.key(0),
                             donate_argnums=(0,))
      m = cost.analytic_training_memory(model, params, paths,
                                        batch['x'].shape, 2,
                                        relu_mask_bits=bits)
      # The step returns every param; the frozen ones pass through.
      out[scheme, bits] = (c.temp_bytes + c.output_bytes - m.frozen_weights,
                           m)
  return out, batch_size * A * 4


def test_analytic_memory_bounds_the_compiled_memory(compiled):
  """0 <= compiled - analytic <= 4 activation tensors.

  The analytic figure counts what must survive from the forward to the
  backward pass; XLA additionally holds the backward pass's working set:
  a layer's incoming gradient, its ReLU-masked copy and its outgoing
  gradient (3 tensors; 2 when XLA reuses the stored float32 pre-activation
  buffer), plus small scalars. We allow 4 tensors. (Measured: 2.0 tensors
  with stock ReLUs and 3.0 with compact ones, at batch 1 and 16.) The bound
  assumes layers whose own working set is a few tensors, as lax's
  convolutions and dots are; the shifted-product depthwise convolution
  materialises its 9 slices (about 12 tensors at the forward peak), which
  benchmarks/train_memory.py reports.
  """
  results, tensor = compiled
  for key, (compiled_bytes, analytic) in results.items():
    slack = compiled_bytes - analytic.training
    assert 0 <= slack <= 4 * tensor, (key, slack / tensor)


def test_scheme_differences_match_within_one_tensor(compiled):
  """The working set cancels between schemes: the saving is predicted."""
  results, tensor = compiled
  for bits in (32, 1):
    got = results['full', bits][0] - results['bias_only', bits][0]
    want = (results['full', bits][1].training -
            results['bias_only', bits][1].training)
    assert abs(got - want) <= tensor, (bits, got, want)


def test_compact_relu_saving_is_the_predicted_one(compiled):
  """Bias-only keeps only ReLU masks: 1 bit instead of 32 per value."""
  results, tensor = compiled
  stock, compact = results['bias_only', 32][0], results['bias_only', 1][0]
  # 3 ReLUs (conv0, dw1, pw1) save 31/32 of a float32 mask each.
  assert abs((stock - compact) - 3 * tensor * 31 / 32) <= tensor
  assert stock > 1.5 * compact
