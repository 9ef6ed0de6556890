"""Starting a run from another run's checkpoint (config.init)."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from ondevice import checkpoint
from ondevice import init_from
from ondevice import models
from ondevice import train


def _state(hidden, seed, steps=0):
  model = models.build_model('mlp', 3, hidden=(hidden,))
  state = train.init_state(model, optax.adam(1e-3), np.zeros((1, 4)),
                           jax.random.key(seed))
  # Move the params so that a loaded model is told apart from a fresh one.
  params = jax.tree.map(lambda p: p + steps, state.params)
  return state._replace(params=params, step=state.step + steps)


def _save(workdir, steps):
  ckpt = checkpoint.Checkpointer(str(workdir))
  for s in steps:
    ckpt.save(s, {'state': _state(8, 0, s), 'totals': {'n': np.float64(s)}})
  ckpt.close()


def test_loads_the_newest_params_into_a_fresh_model(tmp_path):
  _save(tmp_path, [1, 2])
  fresh = _state(8, seed=5)
  params, model_state, step = init_from.load(str(tmp_path), fresh.params, {})
  assert step == 2 and model_state == {}
  want = _state(8, 0, 2).params
  for (path, got), ref in zip(train.flatten_params(params).items(),
                              train.flatten_params(want).values()):
    np.testing.assert_array_equal(got, ref, err_msg=path)
  # The checkpoints/ folder itself works too.
  assert init_from.load(str(tmp_path / 'checkpoints'), fresh.params,
                        {})[2] == 2


def test_a_corrupt_newest_checkpoint_falls_back(tmp_path):
  _save(tmp_path, [1, 2])
  newest = tmp_path / 'checkpoints' / '2'
  files = [os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs
           if f != checkpoint.SIDECAR and os.path.getsize(os.path.join(d, f))
           > 64]
  victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(victim, 'wb').write(bytes(data))
  fresh = _state(8, seed=5)
  _, _, step = init_from.load(str(tmp_path), fresh.params, {})
  assert step == 1


def test_another_model_is_refused_naming_what_differs(tmp_path):
  _save(tmp_path, [1])
  other = _state(16, seed=0)
  with pytest.raises(ValueError, match=r'hidden1/kernel: checkpoint \(4, 8\), '
                     r'model \(4, 16\)'):
    init_from.load(str(tmp_path), other.params, {})


def test_config_init_is_checked_and_optional(tmp_path):
  config = ml_collections.ConfigDict({'init': str(tmp_path / 'nothing')})
  with pytest.raises(ValueError, match='holds no checkpoint'):
    init_from.validate(config)
  fresh = _state(8, seed=5)
  config.init = ''
  init_from.validate(config)
  params, _ = init_from.maybe_load(config, fresh.params, {})
  assert params is fresh.params
