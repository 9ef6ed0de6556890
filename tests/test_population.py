"""Tests of multi-engine speaker populations, their corpora and outliers."""
import dataclasses
import hashlib
import logging

import numpy as np
import pytest

from ondevice import user_corpus as uc
from ondevice.data import espeak
from ondevice.data import outliers
from ondevice.data import population as pop_lib
from ondevice.data import population_corpus as pc
from ondevice.data import speech_keywords as sk
from ondevice.data.engines import flite

KEY = 'config.data.population'
TINY = sk.SpeechCorpusConfig(num_speakers=4, utterances_per_word=2,
                             words=('yes', 'no', 'hey snapdragon'), seed=3)
# Small, dry rooms only, so that impulse responses take milliseconds.
FAST = dataclasses.replace(
    pop_lib.MIXED_UNSEEN, name='fast', held_out_conditions=('child',),
    rooms=(pop_lib.ROOMS[0], pop_lib.ROOMS[0]._replace(
        name='small_room', rt60=(0.3, 0.4), distance=(1.0, 2.0))))


# Computed from the code before populations existed (commit 6e5c5cb).
def test_default_population_is_unchanged(monkeypatch):
  assert sk.cache_path(sk.SpeechCorpusConfig(), '/c') == (
      '/c/speech_keywords_log_mel_da23a64b3ae4b8878838.npz')
  assert sk.cache_path(sk.SpeechCorpusConfig(), '/c', kind='waveform') == (
      '/c/speech_keywords_waveform_8b9cc96ab369ed58128f.npz')
  assert sk.cache_path(TINY, '/c') == (
      '/c/speech_keywords_log_mel_9a42cee7f8db78016515.npz')
  if espeak.version() == '1.51':  # Debian bookworm's espeak-ng
    for index, digest in [(0, 'a3271e0157525488a1113bfd12177601deff7f95b32b'
                              '8638aa1ae0073a3f1275'),
                          (1, '2b7f9e47407713328de7f8a3c2bdecb1b2d561d95355'
                              '706cc1269940dd76377b')]:
      wave = sk.synthesize_speaker(TINY, index)['waveform']
      assert hashlib.sha256(wave.tobytes()).hexdigest() == digest
  calls = []
  monkeypatch.setattr(sk, 'load_speech_keywords',
                      lambda *args: calls.append(args) or 'espeak corpus')
  for value in (None, '', 'espeak'):
    assert sk.load_corpus(TINY, population=value, cache_dir='/c') == (
        'espeak corpus')
  assert calls == [(TINY, '/c', None)] * 3


ALL_FAMILIES = [f.name for f in pop_lib.FAMILIES]


@pytest.mark.parametrize('value,match', [
    ('nope', r"config\.data\.population='nope' is unknown"),
    ({'base': 'nope'}, r"population\.base='nope' is unknown"),
    ({'colour': 1}, r'population has unknown fields'),
    ({'families': {'robots': {'engine': 'mbrola', 'voices': ['x'],
                              'weight': 0.1}}},
     r"population\.families\['robots'\]: engine 'mbrola' is unknown"),
    ({'families': {'flite': {'voices': ['kal', 'joe']}}},
     r"families\['flite'\]: flite has no voice 'joe'"),
    ({'family_weights': {'martians': 1.0}},
     r"family_weights names family 'martians'"),
    ({'held_out_families': ['aliens']}, r'held_out_families: unknown'),
    ({'held_out_families': ALL_FAMILIES}, 'leaves no pre-training speakers'),
    ({'held_out_conditions': ['close_talk', 'living_room', 'hall']},
     'every entry of rooms, which leaves no pre-training speakers'),
    ({'rooms': {'desk': {'size_low': (3, 3, 2.5), 'size_high': (4, 4, 3),
                         'rt60': (0.2, 0.4), 'distance': (0.3, 1.0),
                         'weight': 0.1, 'mic': (3.5, 1.0, 1.0)}}},
     r"rooms\['desk'\]\.mic=.* lies outside the smallest room"),
    ({'rooms': {'hall': {'rt60': (0.0, 0.5)}}},
     r"rooms\['hall'\]\.rt60 .*RT60 > 0"),
    ({'rooms': {'hall': {'rt60': (-0.2, 0.5)}}}, r'RT60 > 0'),
    ({'mics': {'phone': {'high_hz': (3400.0, 9000.0)}}},
     r"mics\['phone'\]: microphone band"),
])
def test_bad_populations_fail_before_synthesis(value, match, monkeypatch,
                                               tmp_path):
  def fail(*args, **kwargs):
    raise AssertionError('synthesis started')
  monkeypatch.setattr(pc, 'synthesize_speaker', fail)
  monkeypatch.setattr(sk, 'synthesize_speaker', fail)
  with pytest.raises(ValueError, match=match):
    sk.load_corpus(TINY, population=value, cache_dir=str(tmp_path))


def test_missing_engine_package_is_named(monkeypatch):
  monkeypatch.setattr(flite, '_binary', lambda: None)
  with pytest.raises(ValueError, match=r"population\.families\['flite'\].*"
                     'apt-get install flite'):
    pop_lib.population_from_config('mixed', KEY)
  # A population without Flite does not need it.
  no_flite = {'families': {'flite': {'engine': 'espeak',
                                     'voices': ('en-us',)}}}
  assert pop_lib.population_from_config(no_flite, KEY) is not None


def test_overrides_edit_the_named_population():
  pop = pop_lib.population_from_config(
      {'base': 'mixed', 'family_weights': {'flite': 0.5},
       'held_out_conditions': ['hall']}, KEY)
  assert dict((f.name, f.weight) for f in pop.families)['flite'] == 0.5
  assert pop.held_out_conditions == ('hall',) and not pop.held_out_families
  assert pop_lib.population_from_config('mixed_unseen', KEY) is (
      pop_lib.MIXED_UNSEEN)


def test_speakers_are_deterministic_and_physical():
  pop = pop_lib.MIXED_UNSEEN
  conditions = {r.name: r for r in pop.rooms}
  for seed in range(300):
    speaker = pc.make_speaker(pop, seed)
    assert speaker == pc.make_speaker(pop, seed)
    room, condition = speaker.room, conditions[speaker.room_condition]
    size = np.array(room.size)
    for point in (room.mic, room.source):
      assert np.all(np.array(point) >= pop_lib.MARGIN_M - 1e-9)
      assert np.all(np.array(point) <= size - pop_lib.MARGIN_M + 1e-9)
    assert condition.rt60[0] <= room.rt60 <= condition.rt60[1]
    assert condition.distance[0] - 1e-9 <= room.distance <= (
        condition.distance[1] + 1e-9)
    assert speaker.unseen == (
        speaker.family == 'festival_foreign' or
        speaker.timbre == 'child' or speaker.room_condition == 'hall')


def test_family_frequencies_follow_the_weights():
  n = 2000
  counts = {f.name: 0 for f in pop_lib.FAMILIES}
  unseen = 0
  for seed in range(n):
    speaker = pc.make_speaker(pop_lib.MIXED_UNSEEN, seed)
    counts[speaker.family] += 1
    unseen += speaker.unseen
  for family in pop_lib.FAMILIES:  # Binomial counts: within 5 sd.
    mean = n * family.weight
    assert abs(counts[family.name] - mean) <= 5 * np.sqrt(
        mean * (1 - family.weight)), family
  # Seen: not festival_foreign (.85), not child (.88), not hall (.8).
  p_seen = 0.85 * 0.88 * 0.8
  assert abs(n - unseen - n * p_seen) <= 5 * np.sqrt(n * p_seen * (1 - p_seen))


def _first_index_of(pop, family, seed=0):
  return next(i for i in range(1000)
              if pc.speaker_at(pop, seed, i).family == family)


@pytest.mark.parametrize('family', ALL_FAMILIES)
def test_every_family_gives_clean_deterministic_clips(family):
  config = dataclasses.replace(TINY, utterances_per_word=1,
                               words=('no', 'hey snapdragon'), seed=0)
  index = _first_index_of(FAST, family)
  clips = pc.synthesize_speaker(config, FAST, index)
  assert clips['waveform'].shape == (2, sk.CLIP_SAMPLES)
  assert clips['waveform'].dtype == np.int16
  np.testing.assert_array_equal(clips['y'], [0, 1])
  np.testing.assert_array_equal(
      clips['waveform'], pc.synthesize_speaker(config, FAST, index)['waveform'])
  for clip in clips['waveform'] / 32768.0:
    power = np.sort(np.mean(clip[:16000].reshape(-1, 400) ** 2, axis=1))
    # Speech well above the noise floor of the quietest frames (the noisiest
    # condition is 5 dB SNR on average over the word).
    assert power[-1] > 3 * np.median(power[:10])
    assert np.max(np.abs(clip)) > 0.03


def test_espeak_clips_do_not_depend_on_the_word_list():
  index = _first_index_of(FAST, 'espeak_english')
  small = dataclasses.replace(TINY, utterances_per_word=1, words=('no',))
  big = dataclasses.replace(small, words=('yes', 'no'))
  np.testing.assert_array_equal(
      pc.synthesize_speaker(small, FAST, index)['waveform'][0],
      pc.synthesize_speaker(big, FAST, index)['waveform'][1])


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp('population_cache'))
  config = dataclasses.replace(TINY, num_speakers=6, utterances_per_word=1,
                               words=('yes', 'no'), seed=0)
  return cache_dir, config, pc.load_population_keywords(config, FAST,
                                                        cache_dir)


def test_pretraining_corpus_holds_the_seen_speakers(tiny):
  _, config, ds = tiny
  seen = pc.seen_indices(config, FAST)
  assert 2 <= len(seen) < 6  # seed 0 has unseen speakers among 0..5
  np.testing.assert_array_equal(ds.clients(), seen)
  assert ds.x.shape == (2 * len(seen), 98, 40) and ds.x.dtype == np.float32
  assert not ds.meta['is_unseen'].any()
  families = ds.info['names']['family']
  for row in range(len(ds)):
    speaker = pc.speaker_at(FAST, 0, int(ds.client_id[row]))
    assert families[ds.meta['family'][row]] == speaker.family
    assert ds.info['names']['room'][ds.meta['room'][row]] == (
        speaker.room_condition)
  np.testing.assert_array_equal(ds.meta['accent_group'], ds.meta['family'])


def test_cache_hit_gives_the_same_arrays(tiny, monkeypatch):
  cache_dir, config, ds = tiny
  def fail(*args, **kwargs):
    raise AssertionError('synthesised despite a cache hit')
  monkeypatch.setattr(pc, 'synthesize_speaker', fail)
  again = pc.load_population_keywords(config, FAST, cache_dir)
  np.testing.assert_array_equal(again.x, ds.x)
  np.testing.assert_array_equal(again.client_id, ds.client_id)


def test_build_logs_progress_with_eta(tmp_path, caplog):
  # The absl logger's own level too: an earlier test in the same worker may
  # have left absl at WARNING.
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger='absl')
  config = dataclasses.replace(TINY, num_speakers=2, utterances_per_word=1,
                               words=('yes',), seed=0)
  pc.load_speakers(config, FAST, [0, 1], str(tmp_path), kind='waveform')
  assert 'Speech keywords: 2/2 speakers, 2 clips' in caplog.text
  assert 's left' in caplog.text


def test_cache_key_covers_what_changes_the_arrays(monkeypatch):
  base = pc.cache_path(TINY, FAST, [0, 1], cache_dir='/c')
  assert pc.cache_path(TINY, dataclasses.replace(FAST), [0, 1],
                       cache_dir='/c') == base
  assert base.startswith('/c/speech_population_log_mel_')
  changes = [
      (TINY, dataclasses.replace(FAST, held_out_families=()), [0, 1]),
      (TINY, dataclasses.replace(FAST, f0_jitter_semitones=0.1), [0, 1]),
      (TINY, dataclasses.replace(FAST, rooms=FAST.rooms[:1]), [0, 1]),
      (dataclasses.replace(TINY, seed=4), FAST, [0, 1]),
      (TINY, FAST, [0, 2]),
  ]
  for config, pop, indices in changes:
    assert pc.cache_path(config, pop, indices, cache_dir='/c') != base
  assert pc.cache_path(TINY, FAST, [0, 1], 'waveform', '/c') != base
  pc._engine_version.cache_clear()
  monkeypatch.setattr(flite, 'version', lambda: 'flite-9.9')
  assert pc.cache_path(TINY, FAST, [0, 1], cache_dir='/c') != base
  pc._engine_version.cache_clear()


USERS_CORPUS = sk.SpeechCorpusConfig(num_speakers=200, seed=0)


def test_select_users_picks_both_kinds_of_new_speakers():
  indices = uc.pick_users(USERS_CORPUS, 200, 5, 3, spread_accents=False,
                          population='mixed_unseen')
  assert len(indices) == 8 and min(indices) >= 200
  unseen = [pc.speaker_at(pop_lib.MIXED_UNSEEN, 0, i).unseen for i in indices]
  assert sum(unseen) == 3
  with pytest.raises(ValueError, match='num_outlier'):
    uc.pick_users(USERS_CORPUS, 200, 5, 50, spread_accents=False,
                  max_scan=20, population=pop_lib.MIXED_UNSEEN)


def test_pick_users_of_a_population_matches_a_plain_scan():
  typical, unseen = [], []
  index = 200
  while len(typical) < 4 or len(unseen) < 3:
    kind = unseen if pc.speaker_at(FAST, 0, index).unseen else typical
    if len(kind) < (3 if kind is unseen else 4):
      kind.append(index)
    index += 1
  assert uc.pick_users(USERS_CORPUS, 200, 4, 3, spread_accents=False,
                       population=FAST) == sorted(typical + unseen)
  # Spread: the typical users first, then the unseen, over distinct families
  # while any family is left among the candidates.
  picked = uc.pick_users(USERS_CORPUS, 200, 3, 3, population=FAST)
  speakers = [pc.speaker_at(FAST, 0, i) for i in picked]
  assert [s.unseen for s in speakers] == [False] * 3 + [True] * 3
  assert len({s.family for s in speakers[:3]}) == 3
  assert len({s.family for s in speakers[3:]}) == 3


def test_pick_users_rejects_outliers_of_a_population_without_held_out():
  with pytest.raises(ValueError, match=r"config\.data\.population='mixed' "
                     'holds nothing out.*num_outlier=2'):
    uc.pick_users(USERS_CORPUS, 200, 1, 2, population='mixed')
  assert len(uc.pick_users(USERS_CORPUS, 200, 2, 0, population='mixed')) == 2
  with pytest.raises(ValueError, match=r"config\.data\.population='nope'"):
    uc.pick_users(USERS_CORPUS, 200, 1, 1, population='nope')


def test_population_users_through_user_corpus(tmp_path, monkeypatch):
  corpus = sk.SpeechCorpusConfig(num_speakers=200, seed=0,
                                 words=('yes', 'no'))
  indices = uc.pick_users(corpus, 200, 1, 1, spread_accents=False,
                          population=FAST)
  clips = uc.UserClips(utterances_per_word=2, num_noise=2)
  users = uc.load_users(corpus, indices, clips, str(tmp_path),
                        population=FAST)
  kw = users.keywords
  assert users.indices == indices
  assert kw.x.shape == (8, 98, 40) and kw.x.dtype == np.float32
  assert kw.class_names == ('yes', 'no')
  for index in indices:
    rows = kw.client_id == index
    assert sorted(kw.y[rows]) == [0, 0, 1, 1]
    assert sorted(kw.meta['utterance'][rows]) == [0, 0, 1, 1]
    assert set(kw.meta['is_outlier_accent'][rows]) == {
        pc.speaker_at(FAST, 0, index).unseen}
  assert len(users.other_words) == 0
  assert users.other_words.class_names == uc.OTHER_WORDS
  np.testing.assert_array_equal(users.noise.client_id,
                                np.repeat(indices, 2))
  # Noise clips do not depend on the population: the eSpeak path's (with its
  # keyword synthesis stubbed out, the noise comes after it) are the same.
  stub = {'waveform': np.zeros((1, sk.CLIP_SAMPLES), np.int16),
          'y': np.zeros(1, np.int32), 'utterance': np.zeros(1, np.int32)}
  monkeypatch.setattr(uc.sk, 'synthesize_speaker', lambda *args: stub)
  espeak_users = uc.load_users(corpus, indices, clips, str(tmp_path))
  np.testing.assert_array_equal(users.noise.x, espeak_users.noise.x)
  with pytest.raises(ValueError, match='other_utterances=1'):
    uc.load_users(corpus, indices, uc.UserClips(2, 1, 0), str(tmp_path),
                  population=FAST)


def test_worst_users_by_hand():
  # Four calibration clips per user; detection rates .75, .25, .5, .25, 1
  # for users 0..4 (.25 twice: the tie goes to the lower id).
  detected = np.array([1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1,
                       1, 1, 1, 1], bool)
  user = np.repeat(np.arange(5), 4)
  calibration = np.ones(20, bool)
  rates = outliers.per_user_rate(detected, user, calibration)
  assert rates == {0: 0.75, 1: 0.25, 2: 0.5, 3: 0.25, 4: 1.0}
  assert outliers.select_worst_users(detected, user, calibration, 0.2) == [1]
  assert outliers.select_worst_users(detected, user, calibration, 0.4) == [
      1, 3]
  assert outliers.select_worst_users(detected, user, calibration, 0.6) == [
      1, 2, 3]


def test_worst_users_never_read_evaluation_clips():
  rng = np.random.default_rng(0)
  user = np.repeat(np.arange(20), 6)
  utterance = np.tile(np.arange(6), 20)
  calibration, evaluation = outliers.calibration_split(utterance, 3)
  assert not (calibration & evaluation).any()
  assert (calibration | evaluation).all()
  detected = rng.random(120) < 0.7
  chosen = outliers.select_worst_users(detected, user, calibration)
  assert len(chosen) == 4  # 20% of 20 users
  # Whatever happens on the evaluation clips, the selection is the same.
  for _ in range(5):
    changed = np.where(evaluation, rng.random(120) < 0.5, detected)
    assert outliers.select_worst_users(changed, user, calibration) == chosen
  rates = outliers.per_user_rate(detected, user, calibration)
  worst_rate = max(rates[u] for u in chosen)
  assert all(rates[u] >= worst_rate for u in rates if u not in chosen)
  with pytest.raises(ValueError, match='both sides'):
    outliers.calibration_split(utterance, 6)


def test_registry_passes_the_population_to_the_loader(monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ondevice.data import base  # pylint: disable=g-import-not-at-top
  from ondevice.data import registry  # pylint: disable=g-import-not-at-top
  seen = []

  def fake_load(config, pop, cache_dir, num_workers):
    del cache_dir, num_workers
    seen.append((config, pop))
    n = 8
    return base.ArrayDataset(
        x=np.random.default_rng(0).normal(size=(n, 98, 40)).astype(
            np.float32), y=np.zeros(n, np.int32),
        client_id=np.repeat(np.arange(4), 2).astype(np.int32),
        class_names=config.words)

  monkeypatch.setattr(pc, 'load_population_keywords', fake_load)
  data = ml_collections.ConfigDict(dict(
      name='speech_keywords', num_speakers=4, utterances_per_word=1,
      corpus_seed=0, test_fraction=0.5, split_seed=0, cache_dir='',
      population='mixed_unseen'))
  train, test = registry.load_dataset(data)
  assert seen[0][1] is pop_lib.MIXED_UNSEEN
  assert seen[0][0] == sk.SpeechCorpusConfig(num_speakers=4,
                                             utterances_per_word=1)
  assert len(train) + len(test) == 8
  data.population = 'unknown_population'
  with pytest.raises(ValueError, match=r'config\.data\.population='):
    registry.load_dataset(data)


@pytest.mark.parametrize('value', ['mixedd', 3])
def test_registry_rejects_a_bad_population_before_loading(value, monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ondevice.data import registry  # pylint: disable=g-import-not-at-top
  def fail(*args, **kwargs):
    raise AssertionError('loading started')
  monkeypatch.setattr(sk, 'load_corpus', fail)
  monkeypatch.setattr(sk, 'load_speech_keywords', fail)
  data = lambda population: ml_collections.ConfigDict(dict(
      name='speech_keywords', num_speakers=4, utterances_per_word=1,
      corpus_seed=0, test_fraction=0.5, split_seed=0, cache_dir='',
      population=population))
  match = (r"config\.data\.population=.* choose one of \('espeak', "
           r"'mixed', 'mixed_unseen'\)" if isinstance(value, str) else
           r"config\.data\.population=3 must be a name, one of \('espeak', "
           r"'mixed', 'mixed_unseen'\)")
  with pytest.raises(ValueError, match=match):
    registry.validate_data_config(data(value))
  with pytest.raises(ValueError, match=match):
    registry.load_dataset(data(value))
  registry.validate_data_config(data('espeak'))
