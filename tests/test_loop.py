"""Tests of ondevice/loop.py: the shared step loop."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ondevice import loop


def _step(state, i):
  """w grows by i; `hits` counts steps divisible by 3; loss is the new w."""
  w = state['w'] + i
  return {'w': w}, {'loss': w, 'hits': jnp.float32(i % 3 == 0)}


def _run(workdir, **schedule):
  sched = loop.Schedule(**{'num_steps': 10, 'log_every': 2, 'eval_every': 5,
                           'checkpoint_every': 2, **schedule})
  return loop.run_loop({'w': jnp.zeros(())}, _step, sched,
                       workdir=str(workdir),
                       eval_fn=lambda s: {'eval_w': s['w'] * 10},
                       counters=('hits',))


def _without_clock(records):
  return [{k: v for k, v in r.items() if k not in loop.WALL_CLOCK_KEYS}
          for r in records]


def test_logs_window_means_evaluates_and_totals_counters(tmp_path):
  result = _run(tmp_path)
  # w after step i (0-based) is 0 + 1 + ... + i = i (i + 1) / 2.
  w = [i * (i + 1) / 2 for i in range(10)]
  logged = [r for r in result.records if 'loss' in r]
  assert [r['step'] for r in logged] == [2, 4, 6, 8, 10]
  np.testing.assert_allclose([r['loss'] for r in logged],
                             [(w[k] + w[k + 1]) / 2 for k in (0, 2, 4, 6, 8)])
  evals = [(r['step'], r['eval_w']) for r in result.records if 'eval_w' in r]
  assert evals == [(5, w[4] * 10), (10, w[9] * 10)]
  assert result.totals == {'hits': 4.0}   # i = 0, 3, 6, 9
  assert float(result.state['w']) == w[9]
  assert not result.stopped_early


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
  full = _run(tmp_path / 'full')
  first = _run(tmp_path / 'resumed', stop_after=6)
  assert first.stopped_early and float(first.state['w']) == 15.0
  second = _run(tmp_path / 'resumed')
  assert _without_clock(second.records) == _without_clock(full.records)
  assert second.totals == full.totals
  assert float(second.state['w']) == float(full.state['w'])


def test_resume_from_the_last_checkpoint_drops_later_metric_rows(tmp_path):
  # Checkpoints every 4 steps; stopping at 6 saves 6 too, so the rows of the
  # second run continue from 6 and none is written twice.
  _run(tmp_path, checkpoint_every=4, stop_after=6)
  result = _run(tmp_path, checkpoint_every=4)
  steps = [r['step'] for r in result.records]
  assert steps == sorted(set(steps))


def test_non_finite_summary_names_the_step(tmp_path):
  def step(state, i):
    loss = jnp.where(i >= 3, jnp.nan, 1.0)
    return state, {'loss': loss}
  with pytest.raises(FloatingPointError, match=r'step 4: .*loss'):
    loop.run_loop({'w': jnp.zeros(())}, step,
                  loop.Schedule(num_steps=8, log_every=2),
                  workdir=str(tmp_path))


@pytest.mark.parametrize('field,value', [('num_steps', 0), ('log_every', 0),
                                         ('eval_every', -1),
                                         ('checkpoint_every', -2)])
def test_schedule_rejects_bad_cadence(field, value):
  kwargs = {'num_steps': 4, field: value}
  with pytest.raises(ValueError, match=f'Schedule.{field}'):
    loop.Schedule(**kwargs)


@pytest.mark.parametrize('field', ['checkpoint_every', 'stop_after'])
def test_schedule_resumes_only_on_log_boundaries(field):
  with pytest.raises(ValueError, match=f'{field}=3 must be a multiple of '
                     'log_every=2'):
    loop.Schedule(num_steps=10, log_every=2, **{field: 3})
