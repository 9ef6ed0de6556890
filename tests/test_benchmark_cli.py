"""benchmarks/cli.py: every benchmark script importable in one process."""
from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys

from absl import flags
import pytest

from benchmarks import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, 'benchmarks', '*.py'))
    if not p.endswith('__init__.py'))


def test_every_benchmark_module_imports_beside_the_others():
  global_names = set(flags.FLAGS)
  own = {}
  for name in SCRIPTS:
    module = importlib.import_module(f'benchmarks.{name}')
    if hasattr(module, 'FLAGS'):
      assert isinstance(module.FLAGS, flags.FlagValues), name
      assert module.FLAGS is not flags.FLAGS, name
      own[name] = set(module.FLAGS)
  # Importing defined none of the scripts' flags in absl's global ones
  # (libraries such as orbax may add their own)...
  added = set(flags.FLAGS) - global_names
  assert not added & set().union(*own.values()), added
  # ...although scripts share flag names with different defaults.
  assert 'rounds' in own['dp_curve'] and 'rounds' in own['fedjax_comparison']
  from benchmarks import dp_curve, fedjax_comparison  # pylint: disable=g-import-not-at-top,g-multiple-import
  assert dp_curve.FLAGS['rounds'].default == 300
  assert fedjax_comparison.FLAGS['rounds'].default == 8
  assert 'dp_curve' in own and len(own) >= 15


def test_parse_starts_from_the_defaults():
  from benchmarks import fedjax_comparison  # pylint: disable=g-import-not-at-top
  rest = cli.parse(fedjax_comparison.FLAGS,
                   ['prog', '--rounds=3', '--models=mlp_2k', 'extra'])
  assert rest == ['prog', 'extra']
  assert fedjax_comparison.FLAGS.rounds == 3
  assert fedjax_comparison.FLAGS.models == ['mlp_2k']
  cli.parse(fedjax_comparison.FLAGS, ['prog', '--seeds=1'])
  # Nothing of the earlier parse is kept.
  assert fedjax_comparison.FLAGS.rounds == 8
  assert fedjax_comparison.FLAGS.models == [
      'mlp_2k', 'cnn_2k', 'cnn_20k', 'mlp_200k']
  with pytest.raises(flags.Error, match='nonsense'):
    cli.parse(fedjax_comparison.FLAGS, ['prog', '--nonsense=1'])


def _script(args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m'] + args, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


def test_a_script_runs_with_its_flags_and_names_a_wrong_one(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  with open(run / 'metrics.jsonl', 'w') as f:
    f.write(json.dumps({'step': 10, 'train_accuracy': 0.5,
                        'test_accuracy': 0.25}) + '\n')
  out = tmp_path / 'curves.json'
  done = _script(['benchmarks.pretrain_curves', f'--pretrain_runs=a={run}',
                  f'--out={out}'], cwd=ROOT)
  assert done.returncode == 0, done.stderr
  with open(out) as f:
    assert json.load(f)['runs']['a']['last_test_accuracy'] == 0.25
  # The script's flags are listed by --helpshort, absl's own still parse.
  done = _script(['benchmarks.pretrain_curves', '--helpshort'], cwd=ROOT)
  assert '--pretrain_runs' in done.stdout + done.stderr
  done = _script(['benchmarks.pretrain_curves', '--pretrain_rnus=a=b'],
                 cwd=ROOT)
  assert done.returncode == 1
  assert 'pretrain_rnus' in done.stderr


def test_a_config_benchmark_names_a_misspelt_override(tmp_path):
  done = _script(['benchmarks.finetune_tuning',
                  '--config=configs/few_shot_kws.py:outliers,smoke',
                  '--config.pretrain.bach_size=3', f'--workdir={tmp_path}'],
                 cwd=ROOT)
  assert done.returncode == 1
  assert ("FATAL Flags parsing error: --config.pretrain.bach_size: "
          "config.pretrain has no field 'bach_size' (did you mean "
          "'batch_size'?)") in done.stderr
  assert 'Traceback' not in done.stderr
  assert not any(tmp_path.iterdir())  # Nothing started.
