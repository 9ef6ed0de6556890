"""Tests of ondevice/options.py: named choices and config checks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import ml_collections
import pytest

from ondevice import options


def _scale(x, factor: float = 2.0, offset: int | None = None, *,
           name: str = 'a'):
  return x * factor + (offset or 0), name


def _shift(x, amount: float):
  return x + amount


TABLE = {'scale': _scale, 'shift': _shift}


def test_keyword_defaults_take_defaults_and_type_none_as_placeholder():
  defaults = options.keyword_defaults(_scale)
  assert set(defaults) == {'factor', 'offset', 'name'}
  assert defaults['factor'] == 2.0 and defaults['name'] == 'a'
  cfg = ml_collections.ConfigDict(defaults)
  cfg.offset = 3          # a typed placeholder accepts its type ...
  with pytest.raises(TypeError):
    cfg.offset = 'three'  # ... and nothing else.


def test_named_and_selected_round_trip_with_overrides():
  cfg = options.named(TABLE, 'scale', overrides={'shift': {'amount': 0.5}})
  assert cfg.name == 'scale' and cfg.shift.amount == 0.5
  factory, kwargs = options.selected(cfg, TABLE, 'config.op')
  assert factory is _scale
  assert kwargs == {'factor': 2.0, 'name': 'a'}  # unset placeholder dropped
  cfg.name = 'shift'
  factory, kwargs = options.selected(cfg, TABLE, 'config.op')
  assert factory(1.0, **kwargs) == 1.5


def test_selected_names_the_key_and_the_valid_choices():
  cfg = options.named(TABLE, 'scale')
  cfg.name = 'scael'
  with pytest.raises(ValueError, match=r"config\.op\.name='scael'.*"
                     r"\['scale', 'shift'\]"):
    options.selected(cfg, TABLE, 'config.op')
  cfg = options.named(TABLE, 'scale')
  cfg.scale.factr = 1.0
  with pytest.raises(ValueError, match=r"config\.op\.scale has unknown "
                     r"arguments \['factr'\]"):
    options.selected(cfg, TABLE, 'config.op')


def test_named_rejects_a_default_or_override_outside_the_table():
  with pytest.raises(ValueError, match='not one of'):
    options.named(TABLE, 'rotate')
  with pytest.raises(ValueError, match='unknown choices'):
    options.named(TABLE, 'scale', overrides={'rotate': {}})


@pytest.mark.parametrize('check,args,message', [
    (options.positive, ('local.batch_size',), r'config\.local\.batch_size '
     r'must be > 0; got 0'),
    (options.non_negative, ('rate',), r'config\.rate must be >= 0; got -0.5'),
    (options.positive, ('name',), r"config\.name must be a number; got 'x'"),
    (options.positive, ('flag',), r'config\.flag must be a number; got True'),
    (options.positive, ('inf',), r'config\.inf must be finite'),
    (options.positive, ('missing',), r'lacks config\.missing'),
])
def test_number_checks_name_the_key(check, args, message):
  config = ml_collections.ConfigDict(dict(
      local=dict(batch_size=0), rate=-0.5, name='x', flag=True,
      inf=float('inf')))
  with pytest.raises(ValueError, match=message):
    check(config, *args)


def test_in_range_and_one_of():
  config = ml_collections.ConfigDict(dict(delta=1.0, kind='iid'))
  options.in_range(config, 'delta', 0, 1)
  with pytest.raises(ValueError, match=r'config\.delta must be in \(0, 1\); '
                     r'got 1.0'):
    options.in_range(config, 'delta', 0, 1, low_inclusive=False,
                     high_inclusive=False)
  options.one_of(config, 'kind', ['iid', 'dirichlet'])
  with pytest.raises(ValueError, match=r"config\.kind='iid' is unknown; "
                     r"choose one of \['natural'\]"):
    options.one_of(config, 'kind', ['natural'])


def test_require_lists_every_missing_key():
  config = ml_collections.ConfigDict(dict(a=dict(b=1)))
  options.require(config, ['a.b'])
  with pytest.raises(ValueError, match=r"\['config\.a\.c', 'config\.d'\]"):
    options.require(config, ['a.b', 'a.c', 'd'])


def test_every_option_is_settable_from_the_command_line(tmp_path):
  """A locked config built with `named` takes overrides of any choice."""
  config_file = tmp_path / 'cfg.py'
  config_file.write_text(textwrap.dedent('''
      from ondevice import options
      from tests.test_options import TABLE
      import ml_collections
      def get_config():
        c = ml_collections.ConfigDict()
        c.op = options.named(TABLE, 'scale', overrides={'shift': {'amount': 0.5}})
        return c
  '''))
  main = tmp_path / 'main.py'
  main.write_text(textwrap.dedent('''
      from absl import app
      from ml_collections import config_flags
      from ondevice import options
      from tests.test_options import TABLE
      C = config_flags.DEFINE_config_file('config', None, '', lock_config=True)
      def main(argv):
        fn, kw = options.selected(C.value.op, TABLE, 'config.op')
        print('RESULT', fn.__name__, sorted(kw.items()))
      app.run(main)
  '''))
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
      [sys.executable, str(main), f'--config={config_file}',
       '--config.op.name=shift', '--config.op.shift.amount=1.5',
       '--config.op.scale.offset=4'],
      capture_output=True, text=True, cwd=root, timeout=120,
      env={'PYTHONPATH': str(root), 'PATH': '/usr/bin:/bin'})
  assert out.returncode == 0, out.stderr
  assert "RESULT _shift [('amount', 1.5)]" in out.stdout


def test_set_value_walks_the_dotted_key_and_names_a_missing_one():
  config = ml_collections.ConfigDict(dict(local=dict(batch_size=8), seed=0))
  options.set_value(config, 'local.batch_size', 16)
  options.set_value(config, 'seed', 3)
  assert config.local.batch_size == 16 and config.seed == 3
  with pytest.raises(ValueError, match=r'lacks config\.locl'):
    options.set_value(config, 'locl.batch_size', 4)


def test_unknown_key_names_the_missing_part_and_the_closest_field():
  config = ml_collections.ConfigDict(
      {'local': {'batch_size': 8, 'steps': 2}, 'seed': 0})
  assert options.unknown_key(config, 'local.batch_size') is None
  assert options.unknown_key(config, 'seed') is None
  assert options.unknown_key(config, 'local.bach_size') == (
      "config.local has no field 'bach_size' (did you mean 'batch_size'?); "
      "its fields: ['batch_size', 'steps']")
  assert options.unknown_key(config, 'globl.x') == (
      "config has no field 'globl' (did you mean 'local'?); its fields: "
      "['local', 'seed']")
  assert options.unknown_key(config, 'zzz') == (
      "config has no field 'zzz'; its fields: ['local', 'seed']")
  assert options.unknown_key(config, 'seed.x') == (
      'config.seed is a value (int), not a config with fields')


def test_booleans_take_only_true_or_false():
  config = ml_collections.ConfigDict({'a': {'on': True, 'off': False}})
  options.booleans(config, 'a.on', 'a.off')
  with config.a.ignore_type():
    config.a.off = 0  # 0 and 1 are not booleans here.
  with pytest.raises(ValueError,
                     match=r'config.a.off must be True or False; got 0\.'):
    options.booleans(config, 'a.on', 'a.off')
  with pytest.raises(ValueError, match='The config lacks config.a.gone'):
    options.booleans(config, 'a.gone')
