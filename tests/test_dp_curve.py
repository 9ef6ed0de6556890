"""Tests of benchmarks/dp_curve.py: noise calibration, merging, store shards."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import dp_curve
from fedjax_ext import privacy
from ondevice.data import client_store
from ondevice.data import speech_keywords


def _epsilon(z, cohort, population, rounds, delta):
  """The training's accountant, as experiment.py builds it."""
  return privacy.epsilon_curve(z, cohort, population, delta)(rounds)


@pytest.mark.parametrize('target', [4.0])
def test_calibrated_noise_is_the_smallest_within_target(target):
  cohort, population, rounds, delta = 10, 180, 5, 1 / 200
  z = dp_curve.calibrate_noise(target, cohort, population, rounds, delta)
  assert _epsilon(z, cohort, population, rounds, delta) <= target
  # A multiplier 0.1% smaller spends more than the target.
  assert _epsilon(z * 0.999, cohort, population, rounds, delta) > target
  # The same value as dp-accounting's own composition of the same event.
  direct = privacy.compute_epsilon(z, cohort / population, rounds, delta,
                                   sampling='without_replacement',
                                   population_size=population)
  assert direct == pytest.approx(_epsilon(z, cohort, population, rounds,
                                          delta), rel=1e-6)


def test_merge_keeps_existing_keys(tmp_path):
  path = os.path.join(tmp_path, 'results.json')
  with open(path, 'w') as f:
    json.dump({'peak_host_mb_10k': 571.0, 'populations': [160, 10000],
               'dp_curve': [{'epsilon': 1.0, 'accuracy': 0.1}]}, f)
  merged = dp_curve.merge_results(path, {
      'dp_curve': [{'epsilon': 8.0, 'noise_multiplier': 0.5,
                    'accuracy': 0.8}],
      'synthesis_clips_per_second': 300.0})
  assert merged == {
      'peak_host_mb_10k': 571.0, 'populations': [160, 10000],
      'dp_curve': [{'epsilon': 8.0, 'noise_multiplier': 0.5,
                    'accuracy': 0.8}],
      'synthesis_clips_per_second': 300.0}
  assert dp_curve.merge_results(os.path.join(tmp_path, 'none.json'),
                                {'a': 1}) == {'a': 1}


def test_merge_markdown_replaces_only_the_dp_section(tmp_path):
  path = os.path.join(tmp_path, 'results.md')
  with open(path, 'w') as f:
    f.write('# Round cost\n\ntable\n\n' + dp_curve.DP_SECTION + '\n\nold\n')
  text = dp_curve.merge_markdown(path, dp_curve.DP_SECTION + '\n\nnew\n')
  assert text == ('# Round cost\n\ntable\n\n' + dp_curve.DP_SECTION +
                  '\n\nnew\n')


def test_shard_matches_speech_keywords_and_store_round_trips(tmp_path):
  config = dp_curve.corpus_config(num_speakers=3, utterances_per_word=1)
  make_shard = dp_curve.make_shard_fn(config, speakers_per_shard=2)
  shard = make_shard(0)
  assert [c['id'] for c in shard] == [0, 1]
  # Words yes..go are labels 0..9; bed and bird are both 'unknown' (10).
  expected_y = np.array(list(range(10)) + [10, 10])
  for index, client in enumerate(shard):
    clips = speech_keywords.synthesize_speaker(config, index)
    np.testing.assert_array_equal(
        client['x'], speech_keywords.log_mel_int16(clips['waveform']))
    np.testing.assert_array_equal(client['y'], expected_y)
  assert [c['id'] for c in make_shard(1)] == [2]

  stats = {'clips': 0, 'seconds': 0.0}
  store = client_store.build_store(
      os.path.join(tmp_path, 'store'), 2,
      dp_curve.make_shard_fn(config, 2, stats=stats),
      feature_shape=dp_curve.FEATURE_SHAPE,
      class_names=dp_curve.CLASS_NAMES,
      quantizer=client_store.Quantizer.from_range(
          np.full(40, dp_curve.LOG_MEL_RANGE[0]),
          np.full(40, dp_curve.LOG_MEL_RANGE[1])))
  assert stats['clips'] == 3 * 12 and store.num_clients == 3
  step = (dp_curve.LOG_MEL_RANGE[1] - dp_curve.LOG_MEL_RANGE[0]) / 65535
  np.testing.assert_allclose(store.client(1)['x'], shard[1]['x'],
                             atol=step / 2 + 1e-5)
  np.testing.assert_array_equal(store.client(1)['y'], expected_y)


def test_smoke_run_writes_a_curve_within_its_targets(tmp_path):
  from benchmarks import cli  # pylint: disable=g-import-not-at-top
  cli.parse(dp_curve.FLAGS, ['dp_curve', '--smoke', f'--workdir={tmp_path}',
                             '--num_workers=1'])
  dp_curve.main([])
  with open(tmp_path / 'results' / 'results.json') as f:
    results = json.load(f)
  detail = results['dp_curve_detail']
  # FedAvgM by default; its runs live apart from the FedAdam runs.
  assert [(r['cohort'], r['epsilon']) for r in results['dp_curve']] == [
      (10, 4.0), (10, 8.0)]
  detail = detail['by_cohort']['10']
  assert detail['setup']['algorithm'] == 'fedavgm'
  for row in detail['runs']:
    assert row['run_epsilon'] <= row['epsilon']
  # More noise buys the smaller epsilon.
  z4, z8 = (r['noise_multiplier'] for r in results['dp_curve'])
  assert z4 > z8 > 0
  assert 0.0 <= detail['no_dp_accuracy'] <= 1.0
  assert sorted(os.listdir(tmp_path)) == [
      'results', 'runs_group_fedavgm_slr1_clr0.2',
      'runs_group_fedavgm_slr1_clr0.2_clip0.5_adaptive', 'store',
      'synthesis.json']
  assert os.listdir(tmp_path / 'runs_group_fedavgm_slr1_clr0.2') == [
      'cohort_10_rounds_4']
  assert results['synthesis_clips_per_second'] > 0
  with open(tmp_path / 'results' / 'results.md') as f:
    text = f.read()
  assert 'FedAvgM (server momentum 0.9) (server lr 1;' in text
  assert '**Cohort 10**' in text
  assert 'adaptive clip (median, from 0.5)' in text


def _detail(no_dp, accuracies):
  return {'no_dp_accuracy': no_dp, 'generated': 'g', 'runs': [
      {'epsilon': e, 'noise_multiplier': 1.0 / e, 'accuracy': a}
      for e, a in accuracies]}


def test_merge_cohort_replaces_its_own_rows_and_keeps_the_others():
  earlier = dp_curve.merge_cohort({}, 500, _detail(0.7, [(8.0, 0.66)]),
                                  _detail(0.7, [(8.0, 0.66)])['runs'])
  # A row of the earlier single-cohort layout, and this cohort's old row.
  earlier['dp_curve'].append({'epsilon': 4.0, 'accuracy': 0.1})
  earlier = dp_curve.merge_cohort(earlier, 100, _detail(0.6, [(8.0, 0.1)]),
                                  _detail(0.6, [(8.0, 0.1)])['runs'])
  detail = _detail(0.6, [(4.0, 0.5), (8.0, 0.55)])
  merged = dp_curve.merge_cohort(earlier, 100, detail, detail['runs'])
  assert [(r['cohort'], r['epsilon'], r['accuracy'], r['no_dp_accuracy'])
          for r in merged['dp_curve']] == [
              (100, 4.0, 0.5, 0.6), (100, 8.0, 0.55, 0.6),
              (500, 8.0, 0.66, 0.7)]
  assert list(merged['dp_curve_detail']['by_cohort']) == ['100', '500']
  # 0.6 - 0.55 and 0.7 - 0.66, in accuracy (not points).
  by_cohort = merged['dp_curve_detail']['by_cohort']
  assert dp_curve.gap_at_8(by_cohort['100']) == pytest.approx(0.05)
  assert dp_curve.gap_at_8(by_cohort['500']) == pytest.approx(0.04)
  assert dp_curve.gap_at_8(_detail(0.6, [(16.0, 0.6)])) is None
  # Another seed of cohort 100 sits beside seed 0, not over it.
  seeded = dp_curve.merge_cohort(merged, 100, _detail(0.5, [(8.0, 0.4)]),
                                 _detail(0.5, [(8.0, 0.4)])['runs'], seed=1)
  assert [(r['cohort'], r['seed'], r['epsilon'], r['accuracy'])
          for r in seeded['dp_curve']] == [
              (100, 0, 4.0, 0.5), (100, 0, 8.0, 0.55), (100, 1, 8.0, 0.4),
              (500, 0, 8.0, 0.66)]
  assert list(seeded['dp_curve_detail']['by_cohort']) == [
      '100', '100, seed 1', '500']
