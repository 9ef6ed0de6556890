"""Tests for ondevice.models: shapes, hand-counted sizes, hooks, norms, vmap."""

from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ondevice import models

KWS_SHAPE = (2, 98, 40)
IMAGE_SHAPE = (2, 28, 28, 1)


def _input_shape(name):
  return KWS_SHAPE if name.startswith('ds_cnn') else IMAGE_SHAPE


def _abstract_init(model, shape):
  """Variables' shapes without running or compiling anything."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))


def _normal(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _random_variables(model, shape, seed=0):
  """Random variables of the right structure, made with numpy.

  Avoids compiling flax's initialisers (threefry takes seconds to compile on
  a small CPU); the models' own `init` is covered through eval_shape.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[0].key == 'batch_stats':
      return jnp.full(leaf.shape, 1.0 if path[-1].key == 'var' else 0.0)
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 100
    return jnp.asarray(rng.normal(0.0, fan_in**-0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_init(model, shape))


def _paths(params):
  flat = traverse_util.flatten_dict(params, sep='/')
  return set(flat)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_logits_and_features_shapes(name):
  num_classes = 36 if name.startswith('ds_cnn') else 10
  model = models.build_model(name, num_classes)
  shape = _input_shape(name)
  variables = _abstract_init(model, shape)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  logits = jax.eval_shape(model.apply, variables, x)
  feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, method=model.features), variables, x)
  assert logits.shape == (2, num_classes)
  assert feats.ndim == 2 and feats.shape[0] == 2
  # The classifier reads the features: its kernel is [feature_dim, classes].
  kernel = variables['params']['classifier']['kernel']
  assert kernel.shape == (feats.shape[1], num_classes)


def test_ds_cnn_s_param_count_by_hand():
  c, k = 64, 36
  conv0 = 10 * 4 * 1 * c + c       # 10x4 kernel, 1 input channel, bias
  dw = 3 * 3 * c + c               # depthwise: one 3x3 filter per channel
  pw = c * c + c                   # pointwise 1x1 (a [C, C] Dense)
  classifier = c * k + k
  norm = 2 * c                     # scale + bias after every conv
  no_norm = conv0 + 4 * (dw + pw) + classifier
  assert no_norm == 2624 + 4 * (640 + 4160) + 2340 == 24164
  with_norm = no_norm + 9 * norm
  assert with_norm == 25316

  for norm_name, expected in [('batch', with_norm), ('layer', with_norm),
                              ('group', with_norm), ('none', no_norm)]:
    model = models.build_model('ds_cnn_s', k, norm=norm_name)
    params = _abstract_init(model, KWS_SHAPE)['params']
    assert models.count_params(params) == expected, norm_name

  # Batch norm's running statistics are state, not trainable params.
  model = models.build_model('ds_cnn_s', k)
  stats = _abstract_init(model, KWS_SHAPE)['batch_stats']
  assert models.count_params(stats) == 9 * 2 * c


def test_ds_cnn_l_param_count_by_hand():
  c, k = 276, 36
  expected = ((10 * 4 * c + c + 2 * c)
              + 5 * ((9 * c + c + 2 * c) + (c * c + c + 2 * c))
              + c * k + k)
  assert expected == 423420
  params = _abstract_init(models.build_model('ds_cnn_l', k), KWS_SHAPE)
  assert models.count_params(params['params']) == expected


@pytest.mark.parametrize('name,low,high', [
    ('cnn_2k', 1_500, 2_500), ('mlp_2k', 1_500, 2_500),
    ('cnn_20k', 15_000, 25_000), ('mlp_20k', 15_000, 25_000),
    ('cnn_200k', 150_000, 250_000), ('mlp_200k', 150_000, 250_000),
])
def test_size_presets_hit_their_budget(name, low, high):
  params = _abstract_init(models.build_model(name, 10), IMAGE_SHAPE)['params']
  assert low <= models.count_params(params) <= high


def test_mlp_param_formula():
  # One hidden layer of h units on 784 inputs, 10 classes: 795h + 10.
  for h in (3, 25, 256):
    model = models.build_model('mlp', 10, hidden=(h,))
    params = _abstract_init(model, IMAGE_SHAPE)['params']
    assert models.count_params(params) == 795 * h + 10


def test_param_paths_are_stable_and_regex_friendly():
  params = _abstract_init(models.build_model('ds_cnn_s', 12), KWS_SHAPE)
  paths = _paths(params['params'])
  for path in ('conv0/kernel', 'conv0_norm/scale', 'dw4/kernel', 'dw4/bias',
               'pw3/kernel', 'pw3_norm/bias', 'classifier/kernel',
               'classifier/bias'):
    assert path in paths
  assert params['params']['dw1']['kernel'].shape == (3, 3, 1, 64)
  cnn = _abstract_init(models.build_model('cnn', 10), IMAGE_SHAPE)
  assert {'conv1/kernel', 'conv2/bias', 'hidden1/kernel',
          'classifier/bias'} <= _paths(cnn['params'])


def _counting(fn, counter, key):
  def wrapped(*args, **kwargs):
    counter[key] += 1
    return fn(*args, **kwargs)
  return wrapped


@pytest.mark.parametrize('name,num_convs,num_dots', [
    # DS-CNN: conv0 + one depthwise conv per block are convolutions; each
    # block's pointwise layer is a Dense over pixels, plus the classifier.
    ('ds_cnn_s', 1 + 4, 4 + 1), ('ds_cnn_l', 1 + 5, 5 + 1),
    ('cnn', 2, 2), ('mlp', 0, 2),
])
def test_injected_hooks_are_called_once_per_layer(name, num_convs, num_dots):
  counter = {'conv': 0, 'dot': 0}
  model = models.build_model(
      name, 10,
      dot_general=_counting(lax.dot_general, counter, 'dot'),
      conv_general_dilated=_counting(lax.conv_general_dilated, counter,
                                     'conv'))
  variables = _abstract_init(model, _input_shape(name))
  counter.update(conv=0, dot=0)
  x = jax.ShapeDtypeStruct(_input_shape(name), jnp.float32)
  jax.eval_shape(model.apply, variables, x)  # One trace of the forward pass.
  assert counter == {'conv': num_convs, 'dot': num_dots}


def test_scaled_hooks_change_the_output():
  x = _normal((2, 20, 10))
  # Without biases and norms every block is positively homogeneous, so
  # doubling the 4 pointwise Dense layers scales the features by 2**4 and the
  # doubled classifier adds one more factor 2 before its bias.
  kwargs = dict(channels=8, norm='none', conv_bias=False)
  model = models.build_model('ds_cnn_s', 5, **kwargs)
  variables = _random_variables(model, x.shape)
  logits = model.apply(variables, x)

  def doubled_dot(*args, **kw):
    return 2.0 * lax.dot_general(*args, **kw)
  scaled_dot = models.build_model('ds_cnn_s', 5, dot_general=doubled_dot,
                                  **kwargs)
  bias = variables['params']['classifier']['bias']
  np.testing.assert_allclose(scaled_dot.apply(variables, x),
                             2.0**5 * (logits - bias) + bias, rtol=1e-5,
                             atol=1e-5)

  def doubled_conv(*args, **kw):
    return 2.0 * lax.conv_general_dilated(*args, **kw)
  scaled_conv = models.build_model('ds_cnn_s', 5,
                                   conv_general_dilated=doubled_conv,
                                   **kwargs)
  assert not np.allclose(scaled_conv.apply(variables, x), logits)


def test_batch_norm_updates_batch_stats_only_in_train_mode():
  model = models.build_model('ds_cnn_s', 4, channels=8, norm='batch')
  x = 3.0 + _normal((4, 20, 10))
  variables = _random_variables(model, x.shape)
  logits, updates = model.apply(variables, x, train=True,
                                mutable=['batch_stats'])
  assert logits.shape == (4, 4)
  old = variables['batch_stats']['conv0_norm']['mean']
  new = updates['batch_stats']['conv0_norm']['mean']
  assert not np.allclose(old, new)
  assert (jax.tree_util.tree_structure(updates['batch_stats'])
          == jax.tree_util.tree_structure(variables['batch_stats']))
  # Evaluation reads the running averages and needs no mutable collection.
  assert model.apply(variables, x, train=False).shape == (4, 4)


@pytest.mark.parametrize('norm', ['layer', 'group'])
def test_other_norms_run(norm):
  model = models.build_model('cnn_2k', 10, norm=norm)
  x = _normal((2, 28, 28, 1))
  variables = _random_variables(model, x.shape)
  assert 'batch_stats' not in variables
  assert np.all(np.isfinite(model.apply(variables, x, train=True)))


def test_jit_and_vmap_over_a_client_axis_of_params():
  model = models.build_model('ds_cnn_s', 3, channels=8, norm='batch',
                             block_strides=((1, 1),) * 2)
  num_clients = 3
  xs = _normal((num_clients, 2, 20, 10))
  stacked = jax.tree_util.tree_map(
      lambda *leaves: np.stack(leaves),
      *[_random_variables(model, xs.shape[1:], seed) for seed in range(3)])
  assert stacked['params']['pw2']['kernel'].shape == (num_clients, 8, 8)

  batched = jax.jit(jax.vmap(model.apply))(stacked, xs)
  assert batched.shape == (num_clients, 2, 3)
  apply = jax.jit(model.apply)
  for i in range(num_clients):  # The reference: one client at a time.
    one = jax.tree_util.tree_map(lambda leaf, i=i: np.asarray(leaf)[i],
                                 stacked)
    np.testing.assert_allclose(batched[i], apply(one, xs[i]),
                               rtol=1e-5, atol=1e-5)


def test_embedding_model_is_unit_norm_and_has_no_classifier():
  model = models.build_embedding_model('mlp', 16, hidden=(32,))
  x = _normal((3, 28, 28, 1))
  variables = _random_variables(model, x.shape)
  emb = model.apply(variables, x)
  assert emb.shape == (3, 16)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  assert model.apply(variables, x, method=model.features).shape == (3, 32)
  paths = _paths(variables['params'])
  assert paths == {'backbone/hidden1/kernel', 'backbone/hidden1/bias',
                   'head/projection/kernel', 'head/projection/bias'}

  head = models.EmbeddingHead(4)
  feats = _normal((2, 8))
  out = head.apply(_random_variables(head, feats.shape), feats)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
  # A zero vector stays zero instead of becoming NaN.
  np.testing.assert_array_equal(models.l2_normalize(jnp.zeros((1, 3))), 0.0)


def test_embedding_model_passes_hooks_to_backbone_and_head():
  counter = {'dot': 0}
  model = models.build_embedding_model(
      'mlp', 8, hidden=(4,),
      dot_general=_counting(lax.dot_general, counter, 'dot'))
  variables = _abstract_init(model, IMAGE_SHAPE)
  counter['dot'] = 0
  jax.eval_shape(model.apply, variables,
                 jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32))
  assert counter['dot'] == 2  # hidden1 + head/projection.


def test_build_model_errors_say_how_to_fix():
  with pytest.raises(ValueError, match='valid names are .*ds_cnn_s'):
    models.build_model('resnet', 10)
  with pytest.raises(ValueError, match='no field.*widths.*valid fields'):
    models.build_model('mlp', 10, widths=(3,))
  with pytest.raises(ValueError, match="Unknown norm 'instance'"):
    models.build_model('ds_cnn_s', 10, norm='instance')
  with pytest.raises(ValueError, match='num_classes must be positive'):
    models.build_model('cnn', 0)
  with pytest.raises(ValueError, match='pool'):
    models.build_model('cnn', 10, pool='max')
  with pytest.raises(ValueError, match='no features'):
    models.EmbeddingModel(backbone=jnp.zeros(3))


def test_group_count_divides_channels():
  assert models.layers.group_count(64) == 32
  assert models.layers.group_count(276) == 23
  assert models.layers.group_count(20) == 20


@pytest.mark.parametrize('stride,padding', [((1, 1), 'SAME'), ((2, 2), 'SAME'),
                                            ((2, 1), 'VALID'),
                                            ((1, 2), ((1, 0), (2, 1)))])
def test_fast_depthwise_conv_matches_lax(stride, padding):
  from ondevice.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 5)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 5)).astype(np.float32))
  kwargs = dict(dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                feature_group_count=5)
  want = jax.lax.conv_general_dilated(x, w, stride, padding, **kwargs)
  got = layers.depthwise_conv_general_dilated(x, w, stride, padding, **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, padding,
                                                  **kwargs)))
  g_want = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  g_got = jax.grad(loss(layers.depthwise_conv_general_dilated), (0, 1))(x, w)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('stride,padding', [((1, 1), 'SAME'), ((4, 4), 'SAME'),
                                            ((2, 1), 'VALID')])
def test_im2col_conv_matches_lax(stride, padding):
  from ondevice.models import layers
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 12, 9, 3)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(4, 3, 3, 5)).astype(np.float32))
  dn = ('NHWC', 'HWIO', 'NHWC')
  want = jax.lax.conv_general_dilated(x, w, stride, padding,
                                      dimension_numbers=dn)
  got = layers.im2col_conv_general_dilated(x, w, stride, padding,
                                           dimension_numbers=dn)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, padding,
                                                  dimension_numbers=dn)))
  # Both gradients: the input gradient is the transpose of the slicing.
  got_grads = jax.grad(loss(layers.im2col_conv_general_dilated), (0, 1))(x, w)
  want_grads = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape,window', [
    ((3, 8, 8, 4), (1, 2, 2, 1)),   # nn.max_pool(x, (2, 2), (2, 2))
    ((2, 7, 9, 3), (1, 3, 2, 1)),   # VALID drops the last row and column
    ((5, 12), (1, 4)),              # 1-D pooling of [N, T]
])
def test_windowed_max_equals_reduce_window_bit_for_bit(shape, window):
  from ondevice.models import layers
  rng = np.random.default_rng(3)
  # ReLU'd and rounded to halves: most windows hold ties (zeros and equal
  # values), where the gradient's destination is decided by the rule.
  x = np.round(np.maximum(rng.normal(size=shape), 0) * 2) / 2
  x[(0,) * len(shape)] = -0.0   # a signed zero survives as it is
  x = jnp.asarray(x.astype(np.float32))
  reference = lambda v: lax.reduce_window(v, -jnp.inf, lax.max, window,
                                          window, 'VALID')
  fast = lambda v: layers.windowed_max(v, window)
  want, want_vjp = jax.vjp(reference, x)
  got, got_vjp = jax.vjp(fast, x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
  g = jnp.asarray(rng.normal(size=want.shape).astype(np.float32))
  np.testing.assert_array_equal(got_vjp(g)[0], want_vjp(g)[0])
  # Each window sends its gradient to exactly one element.
  hits = np.asarray(got_vjp(jnp.ones_like(g))[0])
  assert hits.sum() == np.prod(want.shape) and set(np.unique(hits)) <= {0, 1}
  # Forward mode too (a select-and-scatter has none to compare with).
  _, tangent = jax.jvp(fast, (x,), (jnp.ones_like(x),))
  np.testing.assert_array_equal(tangent, np.ones(want.shape, np.float32))


def test_windowed_max_rejects_a_window_of_the_wrong_rank():
  from ondevice.models import layers
  with pytest.raises(ValueError, match='for each of the 4 axes'):
    layers.windowed_max(jnp.zeros((1, 4, 4, 1)), (2, 2))
