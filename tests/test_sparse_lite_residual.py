"""TinyTL lite residual branches around a frozen DS-CNN."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ondevice import cost
from ondevice import models
from ondevice import train
from sparse_updates import lite_residual
from sparse_updates import presets
from sparse_updates import rules


def _numpy_init(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.2 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope='module')
def wrapped():
  """A 1-block DS-CNN (16 channels) with a lite residual branch; NumPy
  init avoids compiling initialisers. The branch's output conv starts at
  zero, as in TinyTL."""
  backbone = models.build_model('ds_cnn_s', 5, norm='none', channels=16,
                                block_strides=((1, 1),))
  x = np.random.default_rng(1).normal(size=(4, 20, 8)).astype(np.float32)
  model = lite_residual.LiteResidualModel(
      backbone, lite_residual.dscnn_blocks(1), group_width=8)
  variables = {'params': _numpy_init(jax.eval_shape(
      model.init, jax.random.key(0), x)['params'])}
  for i in range(1, 2):
    project = variables['params'][f'lite_residual{i}']['project']
    project['kernel'] = np.zeros_like(project['kernel'])
  pretrained = {'params': variables['params']['backbone']}
  return backbone, model, pretrained, variables, x


def test_from_pretrained_keeps_the_backbone_and_starts_as_it():
  backbone = models.build_model('ds_cnn_s', 3, norm='batch', channels=8,
                                block_strides=((1, 1),))
  x = np.random.default_rng(2).normal(size=(2, 12, 6)).astype(np.float32)
  model = lite_residual.LiteResidualModel(backbone,
                                          lite_residual.dscnn_blocks(1))
  pretrained = _numpy_init(jax.eval_shape(backbone.init, jax.random.key(0),
                                          x))
  pretrained['batch_stats'] = jax.tree.map(np.abs,
                                           pretrained['batch_stats'])
  variables = lite_residual.from_pretrained(model, pretrained, x,
                                            jax.random.key(1))
  assert set(variables['params']) == {'backbone', 'lite_residual1'}
  for a, b in zip(jax.tree.leaves(variables['params']['backbone']),
                  jax.tree.leaves(pretrained['params'])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      variables['params']['lite_residual1']['project']['kernel'], 0.0)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x),
                             jax.jit(backbone.apply)(pretrained, x),
                             rtol=1e-6, atol=1e-6)
  partial = {'params': pretrained['params']}  # No batch statistics.
  with pytest.raises(ValueError, match='do not cover the backbone'):
    lite_residual.from_pretrained(model, partial, x, jax.random.key(1))


def test_lite_residual_scheme_trains_branches_biases_and_head(wrapped):
  _, model, pretrained, variables, x = wrapped
  scheme = presets.get_rules('lite_residual')
  paths = rules.trainable_paths(variables['params'], scheme)
  # 3 backbone conv biases + the classifier's 2 leaves, and a branch of
  # group_conv (kernel, bias), norm (scale, bias), project (kernel, bias).
  assert len(paths) == 3 + 2 + 6
  assert 'backbone/pw2/kernel' not in paths
  opt = optax.adam(1e-2)
  state = train.state_from_params(variables['params'], {}, opt, paths)
  step = jax.jit(train.make_train_step(train.classification_loss(model), opt,
                                       paths))
  batch = {'x': x, 'y': jnp.array([0, 1, 2, 3]), 'mask': jnp.ones(4)}
  losses = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  new = train.flatten_params(state.params)
  old = train.flatten_params(variables['params'])
  for path in old:
    if path.endswith('/kernel') and path.startswith('backbone/') and (
        'classifier' not in path):
      np.testing.assert_array_equal(new[path], old[path])
  assert not np.allclose(new['lite_residual1/project/kernel'], 0.0)
  del pretrained


def test_branches_store_downsampled_activations():
  backbone = models.build_model('ds_cnn_s', 12, norm='none')
  model = lite_residual.LiteResidualModel(backbone,
                                          lite_residual.dscnn_blocks(4))
  shape = (1, 98, 40)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros(shape))['params']

  def stored(name, bits=1):
    paths = rules.trainable_paths(params, presets.get_rules(name))
    return cost.analytic_training_memory(model, params, paths, shape, 2,
                                         relu_mask_bits=bits)

  lite = stored('lite_residual')
  # conv0 (stride 2) gives 49 x 20 x 64 maps; a branch pools them 2x (SAME:
  # 25 x 10), so its group conv keeps 25 * 10 * 64 float32 for its dW,
  # a quarter of the 49 * 20 * 64 * 4 = 250,880 B a backbone conv would.
  branch = lite.activations_by_layer[
      'backbone/pw2/lite_residual2/group_conv']
  assert branch == 25 * 10 * 64 * 4
  assert stored('bias_only').activations < lite.activations < stored(
      'full').activations


def test_blocks_naming_missing_modules_are_an_error(wrapped):
  backbone, _, pretrained, _, x = wrapped
  model = lite_residual.LiteResidualModel(backbone, (('dw1', 'pw9'),))
  with pytest.raises(ValueError, match="\\['pw9'\\] named in blocks never ran"):
    jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='blocks is empty'):
    jax.eval_shape(lite_residual.LiteResidualModel(backbone, ()).init,
                   jax.random.key(0), x)
  del pretrained
