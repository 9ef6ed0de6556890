"""Tests of the eSpeak NG keyword corpus, its cache and the ctypes wrapper."""
import dataclasses
import os
import shutil

import numpy as np
import pytest

from ondevice.data import espeak
from ondevice.data import speech_keywords as sk

TINY = sk.SpeechCorpusConfig(num_speakers=4, utterances_per_word=2,
                             words=('yes', 'no', 'hey snapdragon'), seed=3)


def _assert_same(a, b):
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.y, b.y)
  np.testing.assert_array_equal(a.client_id, b.client_id)
  for name in a.meta:
    np.testing.assert_array_equal(a.meta[name], b.meta[name])


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(cache folder, dataset) of TINY, built once for the module."""
  cache_dir = str(tmp_path_factory.mktemp('speech_cache'))
  return cache_dir, sk.load_speech_keywords(TINY, cache_dir=cache_dir)


def test_shapes_dtypes_and_columns(tiny):
  _, ds = tiny
  n = 4 * 3 * 2
  assert ds.x.shape == (n, 98, 40) and ds.x.dtype == np.float32
  assert ds.y.dtype == np.int32 and ds.client_id.dtype == np.int32
  assert ds.class_names == TINY.words
  np.testing.assert_array_equal(np.bincount(ds.y), [8, 8, 8])
  assert ds.meta['is_outlier_accent'].dtype == bool
  assert set(ds.meta['utterance']) == {0, 1}
  assert np.all(np.isfinite(ds.x))
  assert ds.info['config'] == dataclasses.asdict(TINY)
  assert ds.info['accent_groups'] == sk.ACCENT_NAMES


def test_clients_are_speakers(tiny):
  _, ds = tiny
  np.testing.assert_array_equal(ds.clients(), np.arange(4))
  # Each client holds every (word, utterance) of its speaker exactly once.
  for c in ds.clients():
    mine = ds.client_id == c
    pairs = set(zip(ds.y[mine], ds.meta['utterance'][mine]))
    assert len(pairs) == mine.sum() == 6
    speaker = ds.info['speakers'][c]
    drawn = sk.make_speaker(sk.speaker_seed(TINY.seed, c))
    assert speaker == dict(dataclasses.asdict(drawn), index=c,
                           is_outlier_accent=drawn.is_outlier_accent)
    group = sk.ACCENT_NAMES.index(speaker['accent_group'])
    assert np.all(ds.meta['accent_group'][mine] == group)
    assert np.all(ds.meta['is_outlier_accent'][mine] ==
                  speaker['is_outlier_accent'])


def test_same_config_rebuilds_identical_arrays(tiny, tmp_path):
  _, ds = tiny
  _assert_same(sk.load_speech_keywords(TINY, cache_dir=str(tmp_path)), ds)


def test_speaker_is_a_function_of_its_seed():
  assert sk.make_speaker(1234) == sk.make_speaker(1234)
  assert len({sk.make_speaker(s) for s in range(50)}) == 50
  speaker = sk.make_speaker(7)
  assert speaker.voice in dict((g.name, g.voices) for g in sk.ACCENT_GROUPS)[
      speaker.accent_group]
  assert speaker.variant in sk.VARIANTS


def test_fewer_words_give_a_subset_of_the_clips():
  small = dataclasses.replace(TINY, num_speakers=1, utterances_per_word=1,
                              words=('no',))
  big = dataclasses.replace(small, words=('yes', 'no'))
  np.testing.assert_array_equal(
      sk.synthesize_speaker(small, 0)['waveform'][0],
      sk.synthesize_speaker(big, 0)['waveform'][1])


def test_cache_hit_does_not_synthesise(tiny, monkeypatch):
  cache_dir, ds = tiny

  def fail(*args, **kwargs):
    raise AssertionError('synthesised despite a cache hit')

  monkeypatch.setattr(sk, 'synthesize_speaker', fail)
  monkeypatch.setattr(espeak, 'synthesize', fail)
  _assert_same(sk.load_speech_keywords(TINY, cache_dir=cache_dir), ds)


@pytest.mark.parametrize('damage', ['truncate', 'flip_bytes', 'edit_array'])
def test_damaged_cache_is_detected_and_rebuilt(tiny, tmp_path, damage):
  cache_dir, ds = tiny
  path = sk.cache_path(TINY, str(tmp_path))
  shutil.copy(sk.cache_path(TINY, cache_dir), path)
  size = os.path.getsize(path)
  if damage == 'edit_array':  # A valid zip whose arrays fail the sha256.
    with np.load(path) as npz:
      arrays = dict(npz)
    arrays['y'] = arrays['y'][::-1].copy()
    np.savez(path, **arrays)
  with open(path, 'r+b') as f:
    if damage == 'truncate':
      f.truncate(size // 2)
    elif damage == 'flip_bytes':  # Three bytes inside the feature array.
      f.seek(size // 2)
      original = f.read(3)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in original))
  with pytest.warns(UserWarning, match='corrupt'):
    rebuilt = sk.load_speech_keywords(TINY, cache_dir=str(tmp_path))
  _assert_same(rebuilt, ds)
  assert os.path.getsize(path) == size  # The rebuilt file replaced it.


def test_cache_key_follows_every_parameter(tmp_path):
  base = sk.cache_path(TINY, str(tmp_path))
  assert sk.cache_path(dataclasses.replace(TINY), str(tmp_path)) == base
  for change in [dict(num_speakers=5), dict(seed=4), dict(snr_db=(5., 30.)),
                 dict(words=('yes', 'no')), dict(utterances_per_word=3),
                 dict(pitch_jitter=2.0)]:
    assert sk.cache_path(dataclasses.replace(TINY, **change),
                         str(tmp_path)) != base, change
  assert sk.cache_path(TINY, str(tmp_path), kind='waveform') != base


def test_config_rejects_unknown_words():
  with pytest.raises(ValueError, match='distinct entries of WORDS'):
    sk.SpeechCorpusConfig(words=('yes', 'maybe'))


def test_outlier_accents_are_rare():
  n = 2000
  counts = {name: 0 for name in sk.ACCENT_NAMES}
  for seed in range(n):
    counts[sk.make_speaker(seed).accent_group] += 1
  # Each count is Binomial(n, weight): within 5 standard deviations.
  for group in sk.ACCENT_GROUPS:
    mean = n * group.weight
    assert abs(counts[group.name] - mean) <= 5 * np.sqrt(
        mean * (1 - group.weight)), group
  rare = [counts[g] for g in sk.OUTLIER_ACCENTS]
  common = [c for g, c in counts.items() if g not in sk.OUTLIER_ACCENTS]
  assert len(rare) == 5 and max(rare) < min(common)
  # Outliers are 13% of speakers: sd of the count is sqrt(n .13 .87) = 15.
  assert abs(sum(rare) - 0.13 * n) <= 5 * 15


def test_word_stands_out_of_the_noise():
  config = dataclasses.replace(TINY, num_speakers=1, utterances_per_word=1,
                               snr_db=(20.0, 20.0))
  clips = sk.synthesize_speaker(config, 0)['waveform'] / 32768.0
  assert clips.shape == (3, sk.CLIP_SAMPLES)
  for clip in clips:
    frames = clip[:16000 // 400 * 400].reshape(-1, 400)  # 25 ms frames
    power = np.sort(np.mean(frames ** 2, axis=1))
    # The word's mean power is 20 dB above the noise, so its loudest frame
    # beats the quietest quarter of the clip (noise, or quiet speech) by far
    # more than 10 dB; the word is not lost in noise or silence.
    assert power[-1] > 10 * np.median(power[:10])
    assert np.max(np.abs(clip)) > 0.05


def test_waveforms_match_features(tmp_path):
  config = dataclasses.replace(TINY, num_speakers=1, utterances_per_word=1,
                               words=('yes',))
  waves = sk.load_speech_waveforms(config, cache_dir=str(tmp_path))
  feats = sk.load_speech_keywords(config, cache_dir=str(tmp_path))
  assert waves.x.shape == (1, 16000) and waves.x.dtype == np.int16
  np.testing.assert_array_equal(sk.log_mel_int16(waves.x).astype(np.float32),
                                feats.x)


def test_espeak_is_reproducible_after_reset():
  def speak():
    espeak.reset()
    return [espeak.synthesize(word, voice=voice, noise_seed=1)
            for word, voice in [('house', 'en+whisper'), ('one', 'de+m3')]]
  first, second = speak(), speak()
  assert espeak.sample_rate() == 22050 and first[0].dtype == np.int16
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_espeak_errors_are_clear(monkeypatch):
  with pytest.raises(ValueError, match='no voice'):
    espeak.synthesize('yes', voice='xx-nonexistent')
  with pytest.raises(ValueError, match='rate=900'):
    espeak.synthesize('yes', rate=900)
  espeak.reset()
  monkeypatch.setenv('ESPEAK_NG_LIBRARY', '/nonexistent/libespeak-ng.so.1')
  with pytest.raises(espeak.EspeakUnavailableError, match='apt-get install'):
    espeak.synthesize('yes')
  monkeypatch.undo()
  assert espeak.synthesize('yes').size > 0
