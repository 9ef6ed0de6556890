"""What every binary shares: the --config path check and the held workdir."""
import os
import subprocess
import sys
import types

from absl import flags
from absl.testing import flagsaver
import ml_collections
import pytest

from configs import kws_central
from experiments import common
from ondevice import workdir

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _binary(*args):
  """Runs experiments.train with `args`; returns (exit code, stderr)."""
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.train', *args], cwd=_ROOT,
      capture_output=True, text=True, timeout=300)
  return result.returncode, result.stderr


def _holder(value):
  return types.SimpleNamespace(value=value)


@pytest.fixture(name='parsed_flags')
def _parsed_flags():
  # run_binary reads --allow_config_change; in-process tests parse no argv.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield


def _config(learning_rate=0.1):
  config = ml_collections.ConfigDict({'learning_rate': learning_rate,
                                      'stride': (4, 4)})
  config.lock()
  return config


def test_missing_config_file_names_the_path(tmp_path):
  code, stderr = _binary('--config=configs/nope.py:smoke',
                         f'--workdir={tmp_path}')
  assert code == 1
  assert "config file 'configs/nope.py'" in stderr
  assert 'does not exist' in stderr
  assert 'config_config' not in stderr and 'Traceback' not in stderr
  assert not os.listdir(tmp_path)  # Nothing started.


def test_unknown_variant_names_the_valid_arguments(tmp_path):
  code, stderr = _binary('--config=configs/kws_central.py:smok',
                         f'--workdir={tmp_path}')
  assert code == 1
  assert "Unknown config argument 'smok'" in stderr
  assert "valid arguments are ['smoke']" in stderr


@pytest.mark.parametrize('override, reason', [
    ('--config.data.num_speakrs=4',
     "config.data has no field 'num_speakrs' (did you mean "
     "'num_speakers'?)"),
    ('--config.nosuch.batch_size=4', "config has no field 'nosuch'"),
    ('--config.seed.x=4', 'config.seed is a value (int), not a config with fields'),
])
def test_unknown_config_key_is_a_flag_error_naming_it(tmp_path, override,
                                                      reason):
  code, stderr = _binary('--config=configs/kws_central.py:smoke', override,
                         f'--workdir={tmp_path}')
  assert code == 1
  assert f'FATAL Flags parsing error: {override.split("=")[0]}: ' in stderr
  assert reason in stderr
  assert 'Traceback' not in stderr
  assert not os.listdir(tmp_path)  # Nothing started.


def test_empty_workdir_is_refused_by_the_binary():
  code, stderr = _binary('--config=configs/kws_central.py:smoke',
                         '--workdir=')
  assert code == 1
  assert '--workdir is empty' in stderr


def test_changed_config_is_refused_by_the_binary(tmp_path):
  config = kws_central.get_config('smoke')
  workdir.claim(str(tmp_path), config).release()
  code, stderr = _binary('--config=configs/kws_central.py:smoke',
                         f'--config.learning_rate={config.learning_rate * 2}',
                         f'--workdir={tmp_path}')
  assert code == 1
  assert (f'config.learning_rate: {config.learning_rate!r} -> '
          f'{config.learning_rate * 2!r}') in stderr
  assert '--allow_config_change' in stderr
  # Refused before any data loaded or anything was written.
  assert sorted(os.listdir(tmp_path)) == ['.lock', 'config.json']


def test_workdir_in_use_is_refused_by_the_binary(tmp_path):
  with workdir.claim(str(tmp_path), None):
    code, stderr = _binary('--config=configs/kws_central.py:smoke',
                           f'--workdir={tmp_path}')
  assert code == 1
  assert f'in use by another run (pid {os.getpid()})' in stderr


@pytest.mark.parametrize('path,why', [
    ('configs', 'exists but is not a file'),
    ('', 'the config path is empty'),
    ('configs/kws_central.py', None),
])
def test_check_config_path(monkeypatch, path, why):
  monkeypatch.chdir(_ROOT)
  if why is None:
    common.check_config_path(path)
  else:
    with pytest.raises(ValueError, match=why):
      common.check_config_path(path)


def test_run_binary_holds_the_workdir_during_the_run(tmp_path, parsed_flags):
  del parsed_flags
  calls = []
  def run(config, path):
    calls.append((config.learning_rate, path))
    with pytest.raises(RuntimeError, match='in use by another run'):
      workdir.claim(path, None)
  common.run_binary(run, _holder(_config()), _holder(str(tmp_path)))
  assert calls == [(0.1, str(tmp_path))]
  workdir.claim(str(tmp_path), None).release()  # Released afterwards.


def test_run_binary_releases_the_workdir_when_the_run_fails(tmp_path,
                                                           parsed_flags):
  del parsed_flags
  def run(config, path):
    del config, path
    raise FloatingPointError('loss became nan')
  with pytest.raises(FloatingPointError):
    common.run_binary(run, _holder(_config()), _holder(str(tmp_path)))
  workdir.claim(str(tmp_path), None).release()


def test_run_binary_config_change_needs_the_flag(tmp_path, parsed_flags):
  del parsed_flags
  calls = []
  def run(config, path):
    del path
    calls.append(config.learning_rate)
  common.run_binary(run, _holder(_config(0.1)), _holder(str(tmp_path)))
  with pytest.raises(ValueError, match=r'config.learning_rate: 0.1 -> 0.2'):
    common.run_binary(run, _holder(_config(0.2)), _holder(str(tmp_path)))
  assert calls == [0.1]
  with flagsaver.flagsaver(allow_config_change=True):
    common.run_binary(run, _holder(_config(0.2)), _holder(str(tmp_path)))
  assert calls == [0.1, 0.2]


def test_run_binary_refuses_an_empty_workdir(parsed_flags):
  del parsed_flags
  calls = []
  with pytest.raises(ValueError, match='--workdir'):
    common.run_binary(lambda c, w: calls.append(w), _holder(_config()),
                      _holder('  '))
  assert not calls
