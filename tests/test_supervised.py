"""End-to-end tests of the centralised loop: resume, config errors, outputs."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from central import supervised
from configs import kws_central
from ondevice import loop
from ondevice.data.base import ArrayDataset
from quantized_training import optim_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6, 4)).astype(np.float32)
  y = (x[:, 0, 0] > 0).astype(np.int32)
  return ArrayDataset(x=x, y=y, client_id=np.zeros(n, np.int32),
                      class_names=('neg', 'pos'))


def _config(**overrides):
  config = kws_central.get_config('smoke')
  config.model = 'mlp'
  config.norm = 'none'
  config.model_kwargs = {}
  config.num_steps = 12
  config.batch_size = 8
  config.log_every = 3
  config.eval_every = 6
  config.checkpoint_every = 12
  config.schedule = 'warmup_cosine'
  config.warmup_steps = 2
  config.update(overrides)
  return config


def _without_wall_clock(record):
  return {k: v for k, v in record.items() if k not in loop.WALL_CLOCK_KEYS}


def _outputs(workdir):
  with open(workdir / 'final_metrics.json') as f:
    final = _without_wall_clock(json.load(f))
  with open(workdir / 'metrics.jsonl') as f:
    rows = [_without_wall_clock(json.loads(line)) for line in f]
  return final, rows


def _assert_same_leaves(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _some_leaf_differs(a, b) -> bool:
  return not all(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _forbid_compilation(monkeypatch):
  def no_jit(*args, **kwargs):
    raise AssertionError('compilation started before validation')
  monkeypatch.setattr(supervised.jax, 'jit', no_jit)


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
  data = (_synthetic(64, 0), _synthetic(32, 1))
  config = _config(checkpoint_every=3)
  full = supervised.train_and_evaluate(config, str(tmp_path / 'a'),
                                       datasets=data)
  part = supervised.train_and_evaluate(config, str(tmp_path / 'b'),
                                       datasets=data, stop_after_steps=6)
  assert part['metrics'] == {'stopped_at': 6}
  resumed = supervised.train_and_evaluate(config, str(tmp_path / 'b'),
                                          datasets=data)
  _assert_same_leaves(full['state'], resumed['state'])
  # The partial run's params differ: the comparison above is not vacuous.
  assert _some_leaf_differs(part['state'].params, full['state'].params)
  full_final, full_rows = _outputs(tmp_path / 'a')
  resumed_final, resumed_rows = _outputs(tmp_path / 'b')
  assert resumed_final == full_final
  assert resumed_rows == full_rows
  # No duplicate records after resuming.
  assert [r['step'] for r in resumed_rows] == [3, 6, 9, 12]
  assert resumed['metrics']['test_accuracy'] == full_final['test_accuracy']


def test_augmented_run_trains_on_views_and_resumes_bit_for_bit(tmp_path):
  data = (_synthetic(64, 0), _synthetic(32, 1))
  plain = supervised.train_and_evaluate(_config(), str(tmp_path / 'plain'),
                                        datasets=data)
  config = _config(checkpoint_every=6)
  config.augment.update(time_mask=2, freq_mask=1, max_shift=1)
  full = supervised.train_and_evaluate(config, str(tmp_path / 'a'),
                                       datasets=data)
  supervised.train_and_evaluate(config, str(tmp_path / 'b'), datasets=data,
                                stop_after_steps=6)
  resumed = supervised.train_and_evaluate(config, str(tmp_path / 'b'),
                                          datasets=data)
  _assert_same_leaves(full['state'], resumed['state'])
  # The views reach the step: the same seed without them ends elsewhere.
  assert _some_leaf_differs(plain['state'].params, full['state'].params)
  assert _outputs(tmp_path / 'a') == _outputs(tmp_path / 'b')


def test_augment_wider_than_the_features_fails_before_compilation(
    tmp_path, monkeypatch):
  _forbid_compilation(monkeypatch)
  config = _config()
  config.augment.time_mask = 6  # The synthetic clips have 6 frames.
  with pytest.raises(ValueError, match='config.augment.time_mask=6 must be '
                     'below the 6 frames'):
    supervised.train_and_evaluate(config, str(tmp_path), datasets=(
        _synthetic(64, 0), _synthetic(32, 1)))


def test_non_finite_training_stops_naming_the_step(tmp_path):
  data = (_synthetic(64, 0), _synthetic(32, 1))
  config = _config(optimizer='sgd', schedule='constant', learning_rate=1e30)
  with pytest.raises(FloatingPointError, match=r'step (3|6|9|12)\b'):
    supervised.train_and_evaluate(config, str(tmp_path), datasets=data)
  assert not os.path.exists(tmp_path / 'final_metrics.json')


def test_qas_run_moves_weights_as_much_as_float_sgd(tmp_path):
  # With QAS, SGD on W_int = W / s changes W = s * W_int as float SGD changes
  # W (Lin et al. 2022; exact on the grid: test_quant_optim). The QAS run
  # starts from weights snapped to the int8 grid, so its path differs a
  # little; without the s**-2 scaling W would move by lr * s**2 * G_W, some
  # 1e-4 times less.
  data = (_synthetic(64, 0), _synthetic(32, 1))
  config = _config(optimizer='sgd', schedule='constant', learning_rate=0.1,
                   num_steps=6)
  start = supervised.prepare(config, data[0]).state.params
  plain = supervised.train_and_evaluate(config, str(tmp_path / 'a'),
                                        datasets=data)
  config.qas.name = 'qas'
  with_qas = supervised.train_and_evaluate(config, str(tmp_path / 'b'),
                                           datasets=data)
  for layer in ('hidden1', 'classifier'):
    moved_plain = np.abs(plain['state'].params[layer]['kernel'] -
                         start[layer]['kernel']).max()
    moved_qas = np.abs(with_qas['state'].params[layer]['kernel'] -
                       start[layer]['kernel']).max()
    assert 0.5 < moved_qas / moved_plain < 2, layer
  assert (abs(with_qas['metrics']['test_loss'] -
              plain['metrics']['test_loss']) < 0.05)


def test_int8_optimizer_state_is_int8_and_trains(tmp_path):
  data = (_synthetic(512, 0), _synthetic(256, 1))
  config = _config(num_steps=60, batch_size=32, learning_rate=1e-2,
                   log_every=30, eval_every=60, checkpoint_every=60)
  config.optimizer_state.name = 'int8'
  config.optimizer_state.int8.min_size = 4
  out = supervised.train_and_evaluate(config, str(tmp_path), datasets=data)
  quantized = [leaf for leaf in jax.tree.leaves(
      out['state'].opt_state,
      is_leaf=lambda x: isinstance(x, optim_state.QuantizedArray))
               if isinstance(leaf, optim_state.QuantizedArray)]
  # Adam's first moment of the MLP's leaves of >= 4 elements (all but the
  # 2-element classifier bias) is int8; the second moment stays float.
  assert len(quantized) == 3
  assert all(q.codes.dtype == np.int8 for q in quantized)
  assert out['metrics']['test_accuracy'] > 0.8


def test_trainable_preset_from_the_config(tmp_path):
  data = (_synthetic(64, 0), _synthetic(32, 1))
  config = _config(num_steps=3)
  config.trainable.name = 'bias_only'
  out = supervised.train_and_evaluate(config, str(tmp_path), datasets=data)
  # mlp (hidden 128) on 6x4 inputs: biases 128 + 2; kernels stay frozen,
  # except the classifier's (head=True), 128 * 2.
  assert out['metrics']['num_trainable_params'] == 128 + 2 + 256
  assert out['metrics']['num_params'] == 24 * 128 + 128 + 128 * 2 + 2


def test_outputs_are_written(tmp_path):
  data = (_synthetic(512, 0), _synthetic(256, 1))
  out = supervised.train_and_evaluate(
      _config(num_steps=200, batch_size=32, learning_rate=1e-2),
      str(tmp_path), datasets=data)
  for name in ('metrics.jsonl', 'learning_curve.png', 'final_metrics.json'):
    assert os.path.getsize(tmp_path / name) > 0
  assert os.listdir(tmp_path / 'tensorboard')
  # y = [x > 0] on one input feature is learnable well above chance (0.5).
  assert out['metrics']['test_accuracy'] > 0.8


@pytest.mark.parametrize('key,value,match', [
    ('learning_rate', -0.1, 'learning_rate'),
    ('model', 'resnet9000', 'config.model'),
    ('batch_size', 1000, 'batch_size'),
    ('optimizer', 'adamax', 'config.optimizer'),
    ('num_steps', 0, 'num_steps'),
    ('checkpoint_every', 4, 'config.checkpoint_every'),
])
def test_bad_values_fail_before_compilation(tmp_path, monkeypatch, key, value,
                                            match):
  _forbid_compilation(monkeypatch)
  data = (_synthetic(64, 0), _synthetic(32, 1))
  with pytest.raises(ValueError, match=match):
    supervised.train_and_evaluate(_config(**{key: value}), str(tmp_path),
                                  datasets=data)


def test_unknown_override_key_is_rejected_by_the_binary(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/kws_central.py:smoke', '--config.num_stepz=5',
       f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'num_stepz' in proc.stderr


def test_unknown_config_variant_is_rejected():
  with pytest.raises(ValueError, match='smok'):
    kws_central.get_config('smok')


def test_lite_residual_preset_on_a_plain_model_is_an_error():
  # Without lite residual branches the preset would train biases only.
  import sparse_updates  # pylint: disable=g-import-not-at-top
  from ondevice import models  # pylint: disable=g-import-not-at-top
  model = models.build_model('mlp', 2, hidden=(4,))
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 6, 4), np.float32))
  with pytest.raises(ValueError, match='lite residual branches'):
    sparse_updates.resolve('lite_residual', params['params'])
  # A DS-CNN wrapped with branches resolves, and its branches train.
  backbone = models.build_model('ds_cnn_s', 2, channels=8, norm='none',
                                first_kernel=(4, 3), first_stride=(2, 2),
                                block_strides=((1, 1), (2, 2)))
  wrapped = sparse_updates.LiteResidualModel(
      backbone, sparse_updates.dscnn_blocks(2))
  wrapped_params = jax.eval_shape(
      wrapped.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 12, 8), np.float32))['params']
  scheme = sparse_updates.resolve('lite_residual', wrapped_params)
  assert any(p.startswith('lite_residual1/') for p in scheme.paths)
