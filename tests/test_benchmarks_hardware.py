"""benchmarks.hardware: FLOP counts, achieved rates and their table columns.

FLOP numbers are derived by hand: a (m, k) x (k, n) matmul is 2*m*n*k
FLOPs; one SGD step of a bias-free linear classifier x (b, d) @ W (d, c)
does the forward matmul and the weight-gradient matmul x^T (d, b) @ dL/dy
(b, c), 2 * 2*b*d*c, plus elementwise work on the b x c logits and on the
d x c weights (the update).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import hardware
from ondevice import train


class _Linear(nn.Module):
  """x @ W with 10 classes, no bias; takes `train` as the library calls it."""

  @nn.compact
  def __call__(self, x, train=False):  # pylint: disable=redefined-outer-name
    del train
    return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))


def _linear_step_flops(batch: int, features: int) -> float:
  model = _Linear()
  params = model.init(jax.random.key(0), jnp.zeros((1, features)))['params']
  return hardware.train_step_flops(train.classification_loss(model), params,
                                   {}, (batch, features), optax.sgd(0.1))


def test_compiled_flops_of_a_matmul_is_2mnk():
  flops = hardware.compiled_flops(jnp.matmul, jnp.zeros((3, 5)),
                                  jnp.zeros((5, 7)))
  assert flops == 2 * 3 * 7 * 5


def test_compiled_flops_of_a_jitted_matmul_is_2mnk():
  flops = hardware.compiled_flops(jax.jit(jnp.matmul), jnp.zeros((4, 6)),
                                  jnp.zeros((6, 9)))
  assert flops == 2 * 4 * 9 * 6


def test_train_step_flops_holds_both_matmuls_of_a_linear_step():
  b, d, c = 32, 64, 10
  flops = _linear_step_flops(b, d)
  matmuls = 2 * (2 * b * d * c)
  assert flops >= matmuls
  # Softmax, loss and metrics on b x c logits, the update on d x c weights:
  # a few dozen elementwise FLOPs per logit, a few per weight at most.
  assert flops <= matmuls + 64 * b * c + 8 * d * c


def test_train_step_flops_grows_by_the_matmuls_and_update_of_added_inputs():
  # Doubling d to 2d adds d input features: 4*b*d*c more matmul FLOPs and
  # d*c more weights, each updated with a handful of elementwise FLOPs.
  b, d, c = 32, 64, 10
  added = _linear_step_flops(b, 2 * d) - _linear_step_flops(b, d)
  assert 4 * b * d * c <= added <= 4 * b * d * c + 8 * d * c


class _LinearWithBias(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):  # pylint: disable=redefined-outer-name
    del train
    return nn.Dense(10)(x)


def test_train_step_flops_skips_the_weight_gradient_of_frozen_weights():
  # Bias-only: the weight-gradient matmul x^T @ dL/dy (2*b*d*c) is not formed.
  b, d, c = 32, 64, 10
  model = _LinearWithBias()
  params = model.init(jax.random.key(0), jnp.zeros((1, d)))['params']
  loss_fn = train.classification_loss(model)
  full = hardware.train_step_flops(loss_fn, params, {}, (b, d),
                                   optax.sgd(0.1))
  bias = hardware.train_step_flops(loss_fn, params, {}, (b, d),
                                   optax.sgd(0.1), ['Dense_0/bias'])
  assert 2 * b * d * c <= full - bias <= 2 * b * d * c + 8 * d * c


def test_scaled_multiplies_one_step_by_steps_and_clients():
  assert hardware.scaled(1000.0, 4, 10) == 40_000.0
  assert hardware.scaled(1000.0) == 1000.0
  assert hardware.scaled(None, 4, 10) is None


def test_timed_columns_of_2_gflop_in_half_a_second_on_an_8_gflops_peak():
  row = hardware.timed(2e9, 0.5, 8.0)
  assert row == pytest.approx({'gflop': 2.0, 'gflops': 4.0,
                               'fraction_of_peak': 0.5})


def test_timed_without_a_flop_count_is_all_none():
  assert hardware.timed(None, 0.5, 8.0) == {
      'gflop': None, 'gflops': None, 'fraction_of_peak': None}


def test_table_columns_round_and_dash_unknowns():
  assert hardware.table_columns(hardware.timed(2e9, 0.5, 8.0)) == {
      'GFLOP': 2.0, 'GFLOP/s': 4.0, '% of peak': 50.0}
  # 4 significant digits of GFLOP: 1,234,567 FLOPs -> 0.001235 GFLOP.
  assert hardware.table_columns(hardware.timed(1234567.0, 1e-3, 8.0))[
      'GFLOP'] == 0.001235
  assert hardware.table_columns(hardware.timed(None, 0.5, 8.0)) == {
      'GFLOP': '-', 'GFLOP/s': '-', '% of peak': '-'}


def test_peak_text_names_start_and_end():
  start = {'n': 64, 'seconds': 1e-3, 'gflops': 12.34, 'device': 'cpu'}
  end = dict(start, gflops=10.0)
  text = hardware.peak_text(start, end)
  assert '12.3 / 10.0 GFLOP/s' in text
  assert '64 x 64' in text
  assert 'start / end' in text
  assert hardware.peak_text(None, None) == 'Matmul peak: not measured.'


def test_matmul_peak_rate_is_its_flops_over_its_best_time():
  peak = hardware.matmul_peak(n=32, repeats=2)
  assert peak['n'] == 32
  assert peak['gflops'] == pytest.approx(2 * 32 ** 3 / peak['seconds'] / 1e9)
