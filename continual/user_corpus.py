"""Per-user speech corpora for continual learning after enrollment.

The default speech-keyword corpus has 3 utterances of each word per speaker,
too few to enroll a user, stream to them and still hold out test clips. This
module synthesises single users with many utterances per word, reusing
`speech_keywords.synthesize_speaker` so that a user's clip of (word,
utterance) is exactly the one a corpus with that speaker would contain. It
adds what a real device hears besides keywords:

* out-of-vocabulary words the user says (`OTHER_WORDS`), synthesised with the
  same voice, jitter, placement and background noise as the keywords;
* noise-only clips (white, pink or brown noise at a random level).

Users are speakers with index >= `first_index` of the corpus seed, so that
they were never in a pre-training corpus of `first_index` speakers; outlier
users are picked among the rare accents (`speech_keywords.OUTLIER_ACCENTS`).
Features are raw log-mel (`audio.log_mel`); callers normalise them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np

from ondevice.data import espeak
from ondevice.data import speech_keywords as sk

# Everyday words that are not keywords and sound unlike all of them.
OTHER_WORDS = (
    'hello', 'water', 'kitchen', 'music', 'today', 'please', 'window',
    'coffee', 'tomorrow', 'garden', 'yellow', 'number', 'morning', 'dinner',
    'paper', 'button', 'river', 'silver', 'table', 'pocket', 'orange',
    'weather', 'little', 'picture')
NOISE_LEVEL = (0.002, 0.05)  # RMS of noise-only clips, full scale 1.
_OTHER_WORD_OFFSET = 1000    # Keeps rng streams apart from the keywords'.
_NOISE_OFFSET = 2000
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class UserCorpusConfig:
  """Which clips to synthesise for one user; every field enters the cache key.

  Attributes:
    index: the speaker's index in the corpus of seed `corpus_seed`.
    utterances_per_word: clips of every keyword.
    other_utterances: clips of every word in `OTHER_WORDS`.
    num_noise: noise-only clips.
    corpus_seed: seed of the speech corpus the speaker belongs to.
  """
  index: int
  utterances_per_word: int = 20
  other_utterances: int = 6
  num_noise: int = 150
  corpus_seed: int = 0

  def __post_init__(self):
    if self.index < 0 or self.utterances_per_word < 1:
      raise ValueError(f'UserCorpusConfig needs index >= 0 and '
                       f'utterances_per_word >= 1; got {self.index} and '
                       f'{self.utterances_per_word}.')
    if self.other_utterances < 0 or self.num_noise < 0:
      raise ValueError('other_utterances and num_noise must be >= 0; got '
                       f'{self.other_utterances} and {self.num_noise}.')


def pick_users(num_users: int, corpus_seed: int = 0, first_index: int = 200,
               outlier_only: bool = True) -> list[int]:
  """Speaker indices >= first_index, preferring one per accent group.

  Args:
    num_users: how many users.
    corpus_seed: corpus seed that defines the speakers.
    first_index: the first index a pre-training corpus did not contain.
    outlier_only: only speakers of rare accents.

  Returns:
    Indices in increasing order of first appearance: every accent group is
    used once before any is used twice.
  """
  if num_users < 1:
    raise ValueError(f'num_users must be >= 1; got {num_users}.')
  by_group: dict[str, list[int]] = {}
  index = first_index
  # Enough candidates that each rare group (weight >= 2.5%) shows up often.
  while sum(map(len, by_group.values())) < 8 * num_users:
    speaker = sk.make_speaker(sk.speaker_seed(corpus_seed, index))
    if speaker.is_outlier_accent or not outlier_only:
      by_group.setdefault(speaker.accent_group, []).append(index)
    index += 1
  picked = []
  for rank in range(num_users):
    for group in sorted(by_group, key=lambda g: by_group[g][0]):
      if rank < len(by_group[group]) and len(picked) < num_users:
        picked.append(by_group[group][rank])
  return picked


def _noise_clip(rng: np.random.Generator) -> np.ndarray:
  rms = np.exp(rng.uniform(*np.log(NOISE_LEVEL)))
  noise = rms * sk.coloured_noise(rng, sk.CLIP_SAMPLES,
                                  rng.choice([0.0, 1.0, 2.0]))
  return np.clip(np.round(noise * 32767.0), -32768, 32767).astype(np.int16)


def _synthesize(config: UserCorpusConfig) -> dict[str, np.ndarray]:
  """Keywords, other words and noise of one user, as int16 waveforms."""
  corpus = sk.SpeechCorpusConfig(num_speakers=config.index + 1,
                                 utterances_per_word=config.utterances_per_word,
                                 seed=config.corpus_seed)
  keywords = sk.synthesize_speaker(corpus, config.index)
  speaker = sk.make_speaker(sk.speaker_seed(config.corpus_seed, config.index))
  waves, words, utts = [], [], []
  # The engine continues from the keywords: a fixed order keeps clips
  # deterministic.
  for utt in range(config.other_utterances):
    for j, word in enumerate(OTHER_WORDS):
      rng = np.random.default_rng(
          (config.corpus_seed, config.index, _OTHER_WORD_OFFSET + j, utt))
      rate = speaker.speed * np.exp(corpus.rate_jitter *
                                    rng.standard_normal())
      pitch = speaker.pitch + corpus.pitch_jitter * rng.standard_normal()
      raw = espeak.synthesize(
          word, voice=speaker.voice_name,
          rate=np.clip(rate, *espeak.RATE_RANGE),
          pitch=np.clip(pitch, *espeak.PITCH_RANGE),
          pitch_range=speaker.pitch_range, noise_seed=int(rng.integers(2**32)))
      waves.append(sk.place_in_clip(raw, rng, corpus))
      words.append(j)
      utts.append(utt)
  noise = [_noise_clip(np.random.default_rng(
      (config.corpus_seed, config.index, _NOISE_OFFSET, i)))
           for i in range(config.num_noise)]
  empty = np.zeros((0, sk.CLIP_SAMPLES), np.int16)
  return {'keyword_wave': keywords['waveform'], 'keyword_y': keywords['y'],
          'keyword_utt': keywords['utterance'],
          'other_wave': np.stack(waves) if waves else empty,
          'other_word': np.array(words, np.int32),
          'other_utt': np.array(utts, np.int32),
          'noise_wave': np.stack(noise) if noise else empty}


def cache_path(config: UserCorpusConfig, cache_dir: str | None = None) -> str:
  key = json.dumps({'format': _FORMAT, 'config': dataclasses.asdict(config),
                    'other_words': OTHER_WORDS, 'noise': NOISE_LEVEL},
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir or sk.default_cache_dir(),
                      f'continual_user_{config.index}_{digest}.npz')


def load_user(config: UserCorpusConfig,
              cache_dir: str | None = None) -> dict[str, np.ndarray]:
  """Raw log-mel clips of one user, synthesised on first use and cached.

  Returns:
    {'keyword_x' float32 [36 * U, 98, 40], 'keyword_y' word index in
     `speech_keywords.WORDS`, 'keyword_utt' utterance index, 'other_x',
     'other_word' (index in OTHER_WORDS), 'other_utt', 'noise_x'}, plus
    'accent_group' and 'is_outlier_accent' scalars.
  """
  path = cache_path(config, cache_dir)
  if os.path.exists(path):
    with np.load(path) as npz:
      arrays = dict(npz)
  else:
    logging.info('Synthesising continual-learning user %d into %s.',
                 config.index, path)
    waves = _synthesize(config)
    arrays = {}
    for name, value in waves.items():
      if name.endswith('_wave'):
        stem = name[:-len('_wave')]
        arrays[f'{stem}_x'] = (sk.log_mel_int16(value) if len(value) else
                               np.zeros((0, 98, 40), np.float16))
      else:
        arrays[name] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f'.{os.getpid()}.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  speaker = sk.make_speaker(sk.speaker_seed(config.corpus_seed, config.index))
  out = {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
         for k, v in arrays.items()}
  out['accent_group'] = speaker.accent_group
  out['is_outlier_accent'] = speaker.is_outlier_accent
  return out
