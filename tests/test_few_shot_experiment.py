"""End-to-end test of few_shot.run on the smoke config with synthetic data.

The data are tiny Gaussian "utterances" ([5, 4] features, one mean per
word, a per-speaker offset as the accent), so the whole pipeline (global
model, meta-training, personalisation, keyword split, report) runs in
seconds; tests/test_few_shot_*.py check the parts against references.
"""
import json
import os

import numpy as np
import pytest

import few_shot
from configs import few_shot_kws
from ondevice.data.base import ArrayDataset

WORDS = ('yes', 'no', 'up', 'cat', 'dog', 'bird')


def _speakers(first, count, utterances, rng, means):
  rows = [(s, w, u) for s in range(first, first + count)
          for w in range(len(WORDS)) for u in range(utterances)]
  speaker, y, utterance = (np.array(c, np.int32) for c in zip(*rows))
  offset = rng.normal(size=(first + count, 1, 4)) * 0.3
  x = means[y] + offset[speaker] + 0.3 * rng.normal(size=(len(y), 5, 4))
  outlier = speaker % 2 == 1
  return ArrayDataset(
      x=x.astype(np.float32), y=y, client_id=speaker, class_names=WORDS,
      meta={'is_outlier_accent': outlier, 'accent_group': outlier.astype(
          np.int32), 'utterance': utterance})


def test_smoke_config_runs_end_to_end_and_writes_the_report(tmp_path):
  rng = np.random.default_rng(0)
  means = rng.normal(size=(len(WORDS), 5, 4))
  train = _speakers(0, 6, 2, rng, means)
  test = _speakers(6, 2, 2, rng, means)
  users = _speakers(8, 2, 3, rng, means)
  config = few_shot_kws.get_config('smoke')
  config.keywords = WORDS[:3]
  config.keyword_split.names = ()  # Tested in test_few_shot_meta_training.
  config.meta.names = ('fomaml',)  # MAML itself: test_few_shot_meta_learners.
  results = few_shot.run(config, str(tmp_path), datasets=(train, test),
                         users=users)
  personal = results['personalisation']
  assert set(personal) == {'global', 'global+finetune_full', 'fomaml'}
  for by_k in personal.values():
    assert by_k[1]['outlier']['num_users'] == 1
    assert 0.0 <= by_k[1]['all']['false_accept_rate'] <= config.far
  assert results['speakers'] == {'pretrain': 4, 'meta_train': 2, 'test': 2}
  assert 'best_outlier_gain' in results['goals']
  for name in ('results.json', 'report.md', 'detection_vs_k.png'):
    assert os.path.exists(tmp_path / name)
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['goals']['far'] == config.far


def test_config_errors_name_the_key_and_the_fix(tmp_path):
  config = few_shot_kws.get_config('smoke')
  config.norm = 'batch'
  with pytest.raises(ValueError, match="norm='batch' cannot be meta-learned"):
    few_shot.run(config, str(tmp_path))
  config = few_shot_kws.get_config('smoke')
  config.personalize.k_values = (3,)
  with pytest.raises(ValueError, match='utterances_per_word - 1'):
    few_shot.run(config, str(tmp_path))
  config = few_shot_kws.get_config('smoke')
  config.personalize.replay_per_word = -1
  with pytest.raises(ValueError, match='replay_per_word must be an int >= 0'):
    few_shot.run(config, str(tmp_path))
  with pytest.raises(ValueError, match='Unknown config argument'):
    few_shot_kws.get_config('smok')


def test_ds_cnn_backbone_config_is_stateless_and_validates():
  import jax  # pylint: disable=g-import-not-at-top
  from few_shot import experiment  # pylint: disable=g-import-not-at-top
  from central import supervised  # pylint: disable=g-import-not-at-top
  config = few_shot_kws.get_config('smoke,backbone=ds_cnn_s')
  experiment.validate_config(config)
  assert (config.model, config.norm) == ('ds_cnn_s', 'group')
  assert config.pretrain.num_steps == 10  # smoke still shrinks the schedule
  full = few_shot_kws.get_config('backbone=ds_cnn_s')
  assert (full.pretrain.learning_rate, full.pretrain.num_steps) == (3e-3, 1200)
  model = supervised.build_model(experiment.pretrain_config(full), 36,
                                 full.model_kwargs.to_dict())
  variables = model.init(jax.random.key(0), np.zeros((1, 98, 40), np.float32))
  # Group norm keeps no batch statistics, so K-shot fine-tuning is well posed.
  assert set(variables) == {'params'}
  with pytest.raises(ValueError, match="backbone='resnet'"):
    few_shot_kws.get_config('backbone=resnet')


def test_hold_out_speakers_keeps_the_pretraining_pool_without_learners():
  from few_shot import experiment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  train_ds = _speakers(0, 8, 3, rng, rng.normal(size=(len(WORDS), 1, 4)))
  config = few_shot_kws.get_config('smoke')  # meta.names = ('maml',)
  pre, meta = experiment.speaker_pools(config, train_ds)
  # speaker_fraction 0.34 of 8 speakers: 2 or 3 held out, disjoint.
  assert 2 <= len(meta.clients()) <= 3
  assert not set(pre.clients()) & set(meta.clients())
  config.meta.names = ()
  pooled, _ = experiment.speaker_pools(config, train_ds)
  assert sorted(pooled.clients()) == list(range(8))
  config.meta.hold_out_speakers = True
  experiment.validate_config(config)
  held_pre, held_meta = experiment.speaker_pools(config, train_ds)
  assert sorted(held_pre.clients()) == sorted(pre.clients())
  assert sorted(held_meta.clients()) == sorted(meta.clients())
  with config.meta.ignore_type():  # e.g. a config file that set 1
    config.meta.hold_out_speakers = 1
  with pytest.raises(ValueError, match='config.meta.hold_out_speakers must '
                     'be True or False; got 1'):
    experiment.validate_config(config)
