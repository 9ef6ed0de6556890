"""metrics.jsonl: strict JSON, torn last lines dropped, damage elsewhere fatal."""
import json
import logging
import math
import os

import pytest

from ondevice import metric_writer


def _writer(tmp_path):
  return metric_writer.MetricWriter(str(tmp_path), tensorboard=False)


def _lines(path):
  with open(path) as f:
    return f.read().split('\n')


def test_records_round_trip(tmp_path):
  writer = _writer(tmp_path)
  writer.write(1, {'loss': 0.5})
  writer.write(2, {'loss': 0.25, 'accuracy': 0.75})
  writer.close()
  assert metric_writer.read_metrics(writer.path) == [
      {'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25, 'accuracy': 0.75}]


def test_missing_file_is_empty(tmp_path):
  assert metric_writer.read_metrics(str(tmp_path / 'nope.jsonl')) == []


def test_non_finite_values_are_null_on_disk_and_nan_when_read(tmp_path):
  writer = _writer(tmp_path)
  writer.write(1, {'loss': float('nan'), 'epsilon': float('inf'),
                   'neg': float('-inf'), 'ok': 1.5})
  line = _lines(writer.path)[0]
  # Strict JSON: parses with NaN/Infinity tokens refused.
  def refuse(token):
    raise AssertionError(f'non-JSON token {token}')
  assert json.loads(line, parse_constant=refuse) == {
      'step': 1, 'loss': None, 'epsilon': None, 'neg': None, 'ok': 1.5}
  (record,) = metric_writer.read_metrics(writer.path)
  assert math.isnan(record['loss']) and math.isnan(record['epsilon'])
  assert math.isnan(record['neg']) and record['ok'] == 1.5


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  writer = _writer(tmp_path)
  writer.write(1, {'loss': 0.5})
  writer.write(2, {'loss': 0.25})
  with open(writer.path, 'a') as f:
    f.write('{"step": 3, "lo')  # A kill in the middle of a write.
  with caplog.at_level(logging.WARNING):
    records = metric_writer.read_metrics(writer.path)
  assert [r['step'] for r in records] == [1, 2]
  assert 'torn last line 3' in caplog.text


def test_truncate_after_removes_the_torn_line_and_later_records(tmp_path):
  writer = _writer(tmp_path)
  for step in (1, 2, 3):
    writer.write(step, {'loss': 1.0 / step})
  with open(writer.path, 'a') as f:
    f.write('{"step": 4, "lo')
  writer.truncate_after(2)
  assert _lines(writer.path) == ['{"step": 1, "loss": 1.0}',
                                 '{"step": 2, "loss": 0.5}', '']
  writer.write(3, {'loss': 0.125})  # The resumed run rewrites step 3.
  assert [r['loss'] for r in metric_writer.read_metrics(writer.path)] == [
      1.0, 0.5, 0.125]


def test_a_new_writer_cuts_a_torn_tail_before_appending(tmp_path):
  writer = _writer(tmp_path)
  writer.write(1, {'loss': 0.5})
  with open(writer.path, 'a') as f:
    f.write('{"step": 2, "lo')
  resumed = _writer(tmp_path)
  resumed.write(2, {'loss': 0.25})
  assert _lines(resumed.path) == ['{"step": 1, "loss": 0.5}',
                                  '{"step": 2, "loss": 0.25}', '']


def test_a_complete_record_without_its_newline_is_kept(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}')
  writer = _writer(tmp_path)
  writer.write(3, {'loss': 0.125})
  assert [r['step'] for r in metric_writer.read_metrics(writer.path)] == [
      1, 2, 3]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 0.5}\n'
                  '{"step": 2, "lo\n'
                  '{"step": 3, "loss": 0.125}\n')
  with pytest.raises(ValueError) as e:
    metric_writer.read_metrics(str(path))
  assert str(path) in str(e.value) and 'line 2' in str(e.value)
  writer = _writer(tmp_path)
  with pytest.raises(ValueError, match='line 2'):
    writer.truncate_after(3)
  # Nothing was rewritten on the way to the error.
  assert os.path.getsize(path) == len('{"step": 1, "loss": 0.5}\n'
                                      '{"step": 2, "lo\n'
                                      '{"step": 3, "loss": 0.125}\n')


def test_old_files_with_nan_tokens_still_read(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": NaN}\n')
  (record,) = metric_writer.read_metrics(str(path))
  assert math.isnan(record['loss'])


def test_markdown_table():
  assert metric_writer.markdown_table([{'a': 1, 'b': 0.123456}]) == (
      '| a | b |\n|---|---|\n| 1 | 0.1235 |')
