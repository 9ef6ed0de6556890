"""Work directories: one run at a time, under one config."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import ml_collections
from ml_collections import config_dict
import pytest

from ondevice import workdir

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  config = ml_collections.ConfigDict({
      'learning_rate': 0.1, 'num_rounds': 10, 'algorithm': 'fedavg',
      'model_kwargs': {'first_stride': (4, 4)},
      'algorithm_kwargs': ml_collections.ConfigDict(),
      'init': None, 'seed': config_dict.placeholder(int),
      'patience': float('inf'), 'widths': [8, (16, 32)]})
  config.update(overrides)
  config.lock()
  return config


def _holder(path):
  """A live process that claims `path` and waits; returns it once it holds."""
  script = textwrap.dedent(f"""
      import sys, time
      from ondevice import workdir
      claim = workdir.claim({path!r}, None)
      print('held', flush=True)
      time.sleep(120)
  """)
  proc = subprocess.Popen([sys.executable, '-c', script], cwd=_ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


@pytest.mark.parametrize('bad', ['', '   ', None])
def test_empty_workdir_is_refused(bad):
  with pytest.raises(ValueError, match='--workdir'):
    workdir.claim(bad, _config())


def test_first_claim_creates_the_directory_and_records_the_config(tmp_path):
  path = str(tmp_path / 'run' / 'nested')
  with workdir.claim(path, _config()) as held:
    assert held.held
  with open(os.path.join(path, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['learning_rate'] == 0.1
  assert recorded['model_kwargs'] == {'first_stride': [4, 4]}
  assert recorded['patience'] == 'inf' and recorded['seed'] is None
  assert not held.held


def test_same_config_with_tuples_none_and_placeholders_is_accepted(tmp_path):
  workdir.claim(str(tmp_path), _config()).release()
  workdir.claim(str(tmp_path), _config()).release()


def test_changed_config_is_refused_naming_every_key(tmp_path):
  workdir.claim(str(tmp_path), _config()).release()
  changed = _config(learning_rate=0.2, num_rounds=5)
  with changed.unlocked():
    changed.algorithm_kwargs.mu = 0.01
    del changed['patience']
  with pytest.raises(ValueError) as e:
    workdir.claim(str(tmp_path), changed)
  message = str(e.value)
  assert 'config.learning_rate: 0.1 -> 0.2' in message
  assert 'config.num_rounds: 10 -> 5' in message
  assert 'config.algorithm_kwargs.mu: <absent> -> 0.01' in message
  assert "config.patience: 'inf' -> <absent>" in message
  assert 'algorithm:' not in message and 'first_stride' not in message
  assert '--allow_config_change' in message and '--workdir' in message
  # The refused run let go of the lock: an allowed retry can take it.
  workdir.claim(str(tmp_path), changed, allow_config_change=True).release()


def test_allowed_config_change_is_logged_and_recorded(tmp_path, caplog):
  workdir.claim(str(tmp_path), _config()).release()
  with caplog.at_level(logging.WARNING):
    workdir.claim(str(tmp_path), _config(learning_rate=0.2),
                  allow_config_change=True).release()
  assert 'config.learning_rate: 0.1 -> 0.2' in caplog.text
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['learning_rate'] == 0.2
  # Recorded: the same new config is now accepted without the flag.
  workdir.claim(str(tmp_path), _config(learning_rate=0.2)).release()


def test_int_and_bool_and_float_values_differ(tmp_path):
  workdir.claim(str(tmp_path), {'a': 1, 'b': True}).release()
  with pytest.raises(ValueError) as e:
    workdir.claim(str(tmp_path), {'a': 1.0, 'b': 1})
  assert 'config.a: 1 -> 1.0' in str(e.value)
  assert 'config.b: True -> 1' in str(e.value)


def test_second_claim_in_this_process_is_refused(tmp_path):
  with workdir.claim(str(tmp_path), None):
    with pytest.raises(RuntimeError) as e:
      workdir.claim(str(tmp_path), None)
  assert str(tmp_path) in str(e.value)
  assert f'pid {os.getpid()}' in str(e.value)
  workdir.claim(str(tmp_path), None).release()  # Released on exit.


def test_lock_held_by_a_live_process_is_refused(tmp_path):
  proc = _holder(str(tmp_path))
  try:
    with pytest.raises(RuntimeError) as e:
      workdir.claim(str(tmp_path), _config())
    assert str(tmp_path) in str(e.value)
    assert f'pid {proc.pid}' in str(e.value)
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_lock_of_a_killed_process_does_not_stick(tmp_path):
  proc = _holder(str(tmp_path))
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  with workdir.claim(str(tmp_path), _config()) as held:
    with open(tmp_path / workdir.LOCK_FILE) as f:
      assert f.read().strip() == str(os.getpid())
    assert held.held


def test_unreadable_config_json_is_an_error(tmp_path):
  (tmp_path / 'config.json').write_text('{"learning_rate": 0.')
  with pytest.raises(ValueError, match='config.json'):
    workdir.claim(str(tmp_path), _config())


def test_config_to_json_is_stable_and_json_only():
  import numpy as np  # pylint: disable=g-import-not-at-top
  value = workdir.config_to_json({
      'fn': json.dumps, 'dtype': np.dtype('float32'), 'n': np.int64(3),
      'x': np.float32(0.5), 'tags': {'b', 'a'}, 'nan': float('nan'),
      'nested': ml_collections.ConfigDict({'t': (1, (2, 3))})})
  assert value == {'fn': 'json.dumps', 'dtype': "dtype('float32')", 'n': 3,
                   'x': 0.5, 'tags': ['a', 'b'], 'nan': 'nan',
                   'nested': {'t': [1, [2, 3]]}}
  assert json.loads(json.dumps(value, allow_nan=False)) == value
