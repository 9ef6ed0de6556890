"""Checkpoints: checksums, fallback past damaged files, structure errors."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ondevice import checkpoint

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(step):
  """A small state whose every leaf depends on `step`.

  `w` is random (incompressible) and large enough for orbax to store its
  bytes in a data file of their own, where a flipped bit changes a value
  without breaking any of orbax's own structures.
  """
  return {'params': {'w': jax.random.normal(jax.random.key(step), (64, 64)),
                     'b': jnp.full((3,), step, jnp.int32)},
          'key': jax.random.key(100 + step),
          'round': step}


def _assert_tree_is(tree, step):
  want = _tree(step)
  np.testing.assert_array_equal(tree['params']['w'], want['params']['w'])
  np.testing.assert_array_equal(tree['params']['b'], [step] * 3)
  np.testing.assert_array_equal(jax.random.key_data(tree['key']),
                                jax.random.key_data(want['key']))
  assert int(tree['round']) == step


def _saved_twice(workdir, config=None):
  ckpt = checkpoint.Checkpointer(str(workdir), config=config)
  ckpt.save(1, _tree(1))
  ckpt.save(2, _tree(2))
  ckpt.close()
  return checkpoint.Checkpointer(str(workdir), config=config)


def _largest_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir)
           for f in names]
  return max(files, key=os.path.getsize)


def _restore_and_log(ckpt, caplog):
  with caplog.at_level(logging.ERROR):
    return ckpt.restore_latest(_tree(0))


def test_round_trip_and_newest_first(tmp_path):
  ckpt = _saved_twice(tmp_path)
  assert ckpt.all_steps() == [1, 2]
  step, tree = ckpt.restore_latest(_tree(0))
  assert step == 2
  _assert_tree_is(tree, 2)
  _assert_tree_is(ckpt.restore(1, _tree(0)), 1)
  ckpt.close()


def test_no_checkpoint_is_none(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.restore_latest(_tree(0)) is None
  ckpt.close()


def test_flipped_bit_in_array_file_falls_back(tmp_path, caplog):
  ckpt = _saved_twice(tmp_path)
  path = _largest_file(os.path.join(ckpt.directory, '2'))
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x01
  open(path, 'wb').write(bytes(data))
  step, tree = _restore_and_log(ckpt, caplog)
  assert step == 1
  _assert_tree_is(tree, 1)
  # Orbax reads the flipped bytes without complaint: only the checksum
  # catches this one.
  assert 'Checkpoint 2' in caplog.text and 'checksum' in caplog.text
  ckpt.close()


@pytest.mark.parametrize('victim', ['largest', 'manifest.ocdbt', '_METADATA'])
def test_truncated_file_falls_back(tmp_path, caplog, victim):
  ckpt = _saved_twice(tmp_path)
  step_dir = os.path.join(ckpt.directory, '2')
  path = (_largest_file(step_dir) if victim == 'largest'
          else os.path.join(step_dir, 'default', victim))
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)
  step, tree = _restore_and_log(ckpt, caplog)
  assert step == 1
  _assert_tree_is(tree, 1)
  assert 'Checkpoint 2' in caplog.text
  ckpt.close()


def test_missing_sidecar_falls_back(tmp_path, caplog):
  ckpt = _saved_twice(tmp_path)
  os.remove(os.path.join(ckpt.directory, '2', checkpoint.SIDECAR))
  step, tree = _restore_and_log(ckpt, caplog)
  assert step == 1
  _assert_tree_is(tree, 1)
  assert 'Checkpoint 2' in caplog.text
  assert f'no {checkpoint.SIDECAR}' in caplog.text
  ckpt.close()


def test_edited_sidecar_that_still_parses_falls_back(tmp_path, caplog):
  ckpt = _saved_twice(tmp_path)
  path = os.path.join(ckpt.directory, '2', checkpoint.SIDECAR)
  with open(path) as f:
    sidecar = json.load(f)
  sidecar['checksum'] = 'sha256:' + '0' * 64
  with open(path, 'w') as f:
    json.dump(sidecar, f)
  step, _ = _restore_and_log(ckpt, caplog)
  assert step == 1
  assert 'garbled' in caplog.text
  ckpt.close()


def test_every_checkpoint_corrupt_is_an_error(tmp_path, caplog):
  ckpt = _saved_twice(tmp_path)
  for step in (1, 2):
    os.remove(os.path.join(ckpt.directory, str(step), checkpoint.SIDECAR))
  with pytest.raises(ValueError, match='No usable checkpoint') as e:
    _restore_and_log(ckpt, caplog)
  assert 'step 2:' in str(e.value) and 'step 1:' in str(e.value)
  assert 'Checkpoint 1' in caplog.text and 'Checkpoint 2' in caplog.text
  ckpt.close()


def test_explicit_restore_of_a_corrupt_step_raises(tmp_path):
  ckpt = _saved_twice(tmp_path)
  path = _largest_file(os.path.join(ckpt.directory, '2'))
  with open(path, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(ValueError, match='Checkpoint 2 .* unusable'):
    ckpt.restore(2, _tree(0))
  ckpt.close()


def test_shape_mismatch_names_the_leaf_and_both_shapes(tmp_path):
  ckpt = _saved_twice(tmp_path)
  target = _tree(0)
  target['params']['w'] = jnp.zeros((64, 32))
  with pytest.raises(ValueError) as e:
    ckpt.restore_latest(target)
  message = str(e.value)
  assert "['params']['w']" in message
  assert '(64, 64)' in message and '(64, 32)' in message
  ckpt.close()


def test_missing_leaf_is_a_mismatch_not_a_fallback(tmp_path):
  ckpt = _saved_twice(tmp_path)
  target = _tree(0)
  target['params']['extra'] = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"only in the run \[\"\['params'\]"):
    ckpt.restore_latest(target)
  ckpt.close()


def test_save_after_fallback_replaces_the_corrupt_step(tmp_path, caplog):
  ckpt = _saved_twice(tmp_path)
  os.remove(os.path.join(ckpt.directory, '2', checkpoint.SIDECAR))
  step, _ = _restore_and_log(ckpt, caplog)
  assert step == 1
  ckpt.save(2, _tree(2))
  step, tree = ckpt.restore_latest(_tree(0))
  assert step == 2
  _assert_tree_is(tree, 2)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_sidecar_records_the_config(tmp_path):
  config = ml_collections.ConfigDict({'learning_rate': 0.1,
                                      'stride': (4, 4), 'init': None})
  ckpt = _saved_twice(tmp_path, config=config)
  assert ckpt.saved_config(2) == {'learning_rate': 0.1, 'stride': [4, 4],
                                  'init': None}
  ckpt.close()


def test_max_to_keep_below_two_is_refused(tmp_path):
  with pytest.raises(ValueError, match='max_to_keep=1'):
    checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)


def test_damaged_checkpoint_fallback_is_quiet_in_a_fresh_process(tmp_path):
  """Orbax's abandoned reads print no traceback and the process exits 0."""
  # Left alone, orbax closes its event loop while tensorstore still completes
  # the reads it abandoned, and their callbacks print tracebacks at random
  # later moments, up to interpreter shutdown.
  ckpt = _saved_twice(tmp_path)
  manifest = os.path.join(ckpt.directory, '2', 'default', 'manifest.ocdbt')
  data = bytearray(open(manifest, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(manifest, 'wb').write(bytes(data))
  ckpt.close()
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp
      from ondevice import checkpoint
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
      target = {{'params': {{'w': jnp.zeros((64, 64)),
                             'b': jnp.zeros(3, jnp.int32)}},
                 'key': jax.random.key(0), 'round': 0}}
      step, tree = ckpt.restore_latest(target)
      ckpt.save(step + 1, tree)  # The resumed run goes on saving.
      ckpt.close()
      print('RESTORED', step)
  """)
  result = subprocess.run([sys.executable, '-c', script], cwd=_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert 'RESTORED 1' in result.stdout
  assert 'Checkpoint 2' in result.stderr
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved'):
    assert noise not in result.stderr, result.stderr
