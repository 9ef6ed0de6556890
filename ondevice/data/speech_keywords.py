"""Offline speech keywords: the Speech Commands words spoken by eSpeak NG.

A stand-in for Speech Commands v2 (Warden, arXiv:1804.03209) that needs no
download: the same 35 words plus the wake phrase 'hey snapdragon', spoken by
synthetic speakers. A speaker is an accent (an English variant, or a voice of
another language reading the English words with its own letter-to-sound
rules), a voice variant (m1..m7, f1..f5, Klatt, whisper, croak), a pitch, a
pitch range and a speaking rate, all drawn from the speaker's seed. Speakers
are the natural clients for federated and personalisation experiments, and a
few accents are drawn rarely so that their speakers are natural outliers.

Each clip is 1 s at 16 kHz: the word is synthesised with small per-utterance
jitter of rate and pitch, resampled from 22.05 kHz, trimmed of silence,
shifted to a random position (kept whole when it fits), scaled to a random
level and mixed with white, pink or brown noise at a random SNR (the
augmentation of Warden 2018 and of Zhang et al., arXiv:1711.07128). Every
random draw comes from `np.random.default_rng((seed, speaker, word,
utterance))`, and each speaker is synthesised from a freshly reset engine in
a fixed order, so a corpus is a deterministic function of its config.

    ds = load_speech_keywords(SpeechCorpusConfig(num_speakers=200))
    ds.x.shape          # (21600, 98, 40) log-mel, float32
    ds.client_id        # speaker of each clip: one client per speaker

This eSpeak-only corpus is the default population; `load_corpus` also builds
populations of several engines, rooms and microphones with held-out outliers
(`ondevice.data.population`), chosen by `config.data.population`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from typing import Iterator, NamedTuple
import warnings

from absl import logging
import numpy as np
from scipy import signal

from ondevice import audio
from ondevice.data import espeak
from ondevice.data.base import ArrayDataset

SPEECH_COMMANDS_WORDS = (
    'backward', 'bed', 'bird', 'cat', 'dog', 'down', 'eight', 'five',
    'follow', 'forward', 'four', 'go', 'happy', 'house', 'learn', 'left',
    'marvin', 'nine', 'no', 'off', 'on', 'one', 'right', 'seven', 'sheila',
    'six', 'stop', 'three', 'tree', 'two', 'up', 'visual', 'wow', 'yes',
    'zero')
WAKE_PHRASE = 'hey snapdragon'
WORDS = SPEECH_COMMANDS_WORDS + (WAKE_PHRASE,)

CLIP_SAMPLES = 16000                   # 1 s at audio.SAMPLE_RATE
_RESAMPLE_UP, _RESAMPLE_DOWN = 320, 441   # 22050 Hz * 320 / 441 = 16000 Hz
# resample_poly's default Kaiser low-pass, designed once instead of per call.
_RESAMPLE_FILTER = signal.firwin(20 * _RESAMPLE_DOWN + 1, 1.0 / _RESAMPLE_DOWN,
                                 window=('kaiser', 5.0))
_TRIM_LEVEL = 0.01                     # silence: below 1% of the peak (-40 dB)
_FEATURE_BATCH = 64                    # fixed jit shape of the front end
_PHRASE_SPEEDUP = 1.25                 # so that the wake phrase fits in 1 s
_MAX_WORKERS = 4
_CACHE_FORMAT = 1                      # bump when the arrays' meaning changes


class AccentGroup(NamedTuple):
  """eSpeak NG voices that share an accent, and how often speakers get it."""
  name: str
  voices: tuple[str, ...]  # language voices, e.g. 'en-gb-scotland', 'de'
  weight: float


# Weights sum to 1. Groups of weight below OUTLIER_MAX_WEIGHT are the rare
# accents: a speaker from one of them is an outlier client.
ACCENT_GROUPS = (
    AccentGroup('american', ('en-us', 'en-us-nyc'), 0.22),
    AccentGroup('british', ('en', 'en-gb-x-rp', 'en-gb-x-gbclan',
                            'en-gb-x-gbcwmd'), 0.20),
    AccentGroup('scottish', ('en-gb-scotland',), 0.08),
    AccentGroup('caribbean', ('en-029',), 0.07),
    AccentGroup('german', ('de',), 0.08),
    AccentGroup('french', ('fr', 'fr-be', 'fr-ch'), 0.07),
    AccentGroup('spanish', ('es', 'es-419'), 0.08),
    AccentGroup('italian', ('it',), 0.07),
    AccentGroup('finnish', ('fi',), 0.03),
    AccentGroup('hungarian', ('hu',), 0.025),
    AccentGroup('turkish', ('tr',), 0.025),
    AccentGroup('welsh', ('cy',), 0.025),
    AccentGroup('swahili', ('sw',), 0.025),
)
ACCENT_NAMES = tuple(g.name for g in ACCENT_GROUPS)
OUTLIER_MAX_WEIGHT = 0.05
OUTLIER_ACCENTS = tuple(g.name for g in ACCENT_GROUPS
                        if g.weight < OUTLIER_MAX_WEIGHT)

# Variants from espeak-ng-data/voices/!v, drawn uniformly.
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4',
            'f5', 'klatt', 'klatt2', 'klatt3', 'klatt4', 'croak', 'whisper')
PITCH_RANGE = (25, 75)          # eSpeak pitch, 50 = the variant's default
INTONATION_RANGE = (20, 80)     # eSpeak pitch range, 50 = default
SPEED_RANGE = (150, 230)        # words per minute


@dataclasses.dataclass(frozen=True)
class Speaker:
  """A synthetic speaker: an eSpeak voice and its prosody."""
  seed: int
  voice: str           # one of its accent group's voices
  variant: str         # voice variant, e.g. 'f2'
  pitch: int
  pitch_range: int
  speed: int           # words per minute
  accent_group: str

  @property
  def voice_name(self) -> str:
    """The name eSpeak's SetVoiceByName takes, e.g. 'de+f2'."""
    return f'{self.voice}+{self.variant}'

  @property
  def is_outlier_accent(self) -> bool:
    return self.accent_group in OUTLIER_ACCENTS


def make_speaker(seed: int) -> Speaker:
  """Draws a speaker; a deterministic function of `seed`."""
  rng = np.random.default_rng(seed)
  weights = np.array([g.weight for g in ACCENT_GROUPS])
  group = ACCENT_GROUPS[rng.choice(len(weights), p=weights / weights.sum())]
  return Speaker(
      seed=int(seed),
      voice=group.voices[rng.integers(len(group.voices))],
      variant=VARIANTS[rng.integers(len(VARIANTS))],
      pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
      pitch_range=int(rng.integers(INTONATION_RANGE[0],
                                   INTONATION_RANGE[1] + 1)),
      speed=int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
      accent_group=group.name)


@dataclasses.dataclass(frozen=True)
class SpeechCorpusConfig:
  """What to synthesise; every field enters the cache key.

  Attributes:
    num_speakers: speakers (= clients), indexed 0..num_speakers-1.
    utterances_per_word: clips of each word per speaker.
    words: the classes, a subset of `WORDS`, in label order.
    seed: corpus seed; speaker i has seed speaker_seed(seed, i).
    snr_db: range of the background-noise SNR in dB, drawn per clip.
    level: range of the word's peak amplitude (full scale 1), per clip.
    rate_jitter: std of the per-utterance log speaking rate.
    pitch_jitter: std of the per-utterance pitch, in eSpeak pitch units.
  """
  num_speakers: int = 200
  utterances_per_word: int = 3
  words: tuple[str, ...] = WORDS
  seed: int = 0
  snr_db: tuple[float, float] = (10.0, 30.0)
  level: tuple[float, float] = (0.1, 0.7)
  rate_jitter: float = 0.06
  pitch_jitter: float = 3.0

  def __post_init__(self):
    # Canonical types, so that equal configs hash to the same cache key.
    object.__setattr__(self, 'words', tuple(self.words))
    for name in ('snr_db', 'level'):
      object.__setattr__(self, name, tuple(map(float, getattr(self, name))))
    if self.num_speakers < 1 or self.utterances_per_word < 1:
      raise ValueError('num_speakers and utterances_per_word must be '
                       f'positive; got {self.num_speakers} and '
                       f'{self.utterances_per_word}.')
    unknown = [w for w in self.words if w not in WORDS]
    if unknown or not self.words or len(set(self.words)) != len(self.words):
      raise ValueError(f'words must be distinct entries of WORDS; got '
                       f'{self.words!r} (unknown: {unknown}).')
    if not (self.snr_db[0] <= self.snr_db[1] and
            0.0 < self.level[0] <= self.level[1] <= 1.0):
      raise ValueError(f'snr_db must be a (low, high) range and level one '
                       f'within (0, 1]; got {self.snr_db} and {self.level}.')


def speaker_seed(corpus_seed: int, index: int) -> int:
  """Seed of speaker `index` of a corpus: independent streams per speaker."""
  return int(np.random.SeedSequence((corpus_seed, index)).generate_state(1)[0])


def corpus_speakers(config: SpeechCorpusConfig) -> list[Speaker]:
  """Speakers 0..num_speakers-1 of a corpus."""
  return [make_speaker(speaker_seed(config.seed, i))
          for i in range(config.num_speakers)]


def coloured_noise(rng: np.random.Generator, n: int,
                   exponent: float) -> np.ndarray:
  """Unit-power noise with a 1 / f**exponent spectrum (0 white, 1 pink)."""
  real, imag = rng.standard_normal((2, n // 2 + 1))
  spectrum = real + 1j * imag
  freqs = np.fft.rfftfreq(n)
  freqs[0] = freqs[1]  # Keep DC finite; it is removed below anyway.
  noise = np.fft.irfft(spectrum * freqs ** (-exponent / 2.0), n)
  noise -= noise.mean()
  return noise / np.sqrt(np.mean(noise ** 2))


def place_in_clip(raw: np.ndarray, rng: np.random.Generator,
                  config: SpeechCorpusConfig) -> np.ndarray:
  """Turns eSpeak's 22.05 kHz samples into a noisy 1 s int16 clip at 16 kHz."""
  x = signal.resample_poly(raw.astype(np.float64) / 32768.0, _RESAMPLE_UP,
                           _RESAMPLE_DOWN, window=_RESAMPLE_FILTER.copy())
  peak = np.max(np.abs(x))
  if peak == 0.0:
    raise RuntimeError('eSpeak NG returned silence.')
  loud = np.flatnonzero(np.abs(x) > _TRIM_LEVEL * peak)
  word = x[loud[0]:loud[-1] + 1] * (rng.uniform(*config.level) / peak)
  if len(word) > CLIP_SAMPLES:  # Too long: keep a random 1 s window.
    start = rng.integers(len(word) - CLIP_SAMPLES + 1)
    word, offset = word[start:start + CLIP_SAMPLES], 0
  else:
    offset = rng.integers(CLIP_SAMPLES - len(word) + 1)
  clip = np.zeros(CLIP_SAMPLES)
  clip[offset:offset + len(word)] = word
  snr_db = rng.uniform(*config.snr_db)
  noise_power = np.mean(word ** 2) / 10.0 ** (snr_db / 10.0)
  exponent = rng.choice([0.0, 1.0, 2.0])
  clip += np.sqrt(noise_power) * coloured_noise(rng, CLIP_SAMPLES, exponent)
  return np.clip(np.round(clip * 32767.0), -32768, 32767).astype(np.int16)


def synthesize_speaker(config: SpeechCorpusConfig,
                       index: int) -> dict[str, np.ndarray]:
  """All clips of one speaker, from a freshly reset synthesiser.

  The engine's hidden state advances with every call, so utterances are
  spoken in one fixed order over the whole vocabulary (utterance-major),
  whatever `config.words` is: a clip depends only on (seed, speaker, word,
  utterance), and a corpus with fewer words or utterances is a subset.

  Returns:
    {'waveform': int16 [n, 16000], 'y': label in config.words,
     'utterance': [n]} in (word, utterance) order.
  """
  speaker = make_speaker(speaker_seed(config.seed, index))
  espeak.reset()
  clips = {}
  for utt in range(config.utterances_per_word):
    for word_index, word in enumerate(WORDS):
      rng = np.random.default_rng((config.seed, index, word_index, utt))
      rate = speaker.speed * np.exp(config.rate_jitter * rng.standard_normal())
      rate *= _PHRASE_SPEEDUP if word == WAKE_PHRASE else 1.0
      pitch = speaker.pitch + config.pitch_jitter * rng.standard_normal()
      raw = espeak.synthesize(
          word, voice=speaker.voice_name,
          rate=np.clip(rate, *espeak.RATE_RANGE),
          pitch=np.clip(pitch, *espeak.PITCH_RANGE),
          pitch_range=speaker.pitch_range,
          noise_seed=int(rng.integers(2**32)))
      if word in config.words:
        clips[config.words.index(word), utt] = place_in_clip(raw, rng, config)
  keys = sorted(clips)
  return {'waveform': np.stack([clips[k] for k in keys]),
          'y': np.array([k[0] for k in keys], np.int32),
          'utterance': np.array([k[1] for k in keys], np.int32)}


def _speaker_chunks(config: SpeechCorpusConfig, num_workers: int,
                    job=None, indices: list[int] | None = None
                   ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (speaker index, clips) in order, logging progress as it goes.

  Workers are spawned, not forked, since JAX in this process is threaded;
  each has its own eSpeak engine, reset per speaker, so the clips do not
  depend on the number of workers. `job(index)` synthesises one speaker
  (default `synthesize_speaker`) of `indices` (default all speakers).
  """
  job = job or functools.partial(synthesize_speaker, config)
  indices = list(range(config.num_speakers)) if indices is None else indices
  total = len(indices)
  start = time.perf_counter()
  every = max(1, total // 20)
  if num_workers > 1:
    pool = multiprocessing.get_context('spawn').Pool(num_workers)
    results = pool.imap(job, indices)
  else:
    pool, results = None, map(job, indices)
  try:
    for done, (index, clips) in enumerate(zip(indices, results), start=1):
      yield index, clips
      if done % every == 0 or done == total:
        elapsed = time.perf_counter() - start
        count = done * len(config.words) * config.utterances_per_word
        logging.info('Speech keywords: %d/%d speakers, %d clips in %.0f s '
                     '(%.0f clips/s, %.0f s left).', done, total, count,
                     elapsed, count / elapsed, elapsed / done * (total - done))
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()


def log_mel_int16(waveforms: np.ndarray) -> np.ndarray:
  """`audio.log_mel` of int16 clips in fixed-size jitted batches, as float16."""
  out = []
  for start in range(0, len(waveforms), _FEATURE_BATCH):
    batch = waveforms[start:start + _FEATURE_BATCH]
    padded = np.zeros((_FEATURE_BATCH, batch.shape[1]), np.float32)
    padded[:len(batch)] = batch / np.float32(32768.0)
    out.append(np.asarray(audio.log_mel(padded))[:len(batch)])
  return np.concatenate(out).astype(np.float16)


def _build(config: SpeechCorpusConfig, kind: str,
           num_workers: int) -> dict[str, np.ndarray]:
  """Synthesises the corpus; kind 'log_mel' keeps only features."""
  parts = []
  for index, clips in _speaker_chunks(config, num_workers):
    wave = clips.pop('waveform')
    clips['x'] = log_mel_int16(wave) if kind == 'log_mel' else wave
    clips['client_id'] = np.full(len(wave), index, np.int32)
    parts.append(clips)
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  arrays['espeak_version'] = np.array(espeak.version())
  return arrays


def default_cache_dir() -> str:
  """$ONDEVICE_CACHE, else ~/.cache/ondevice."""
  return os.environ.get('ONDEVICE_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ondevice')


def cache_path(config: SpeechCorpusConfig, cache_dir: str | None = None,
               kind: str = 'log_mel') -> str:
  """The cache file of a corpus: named by a hash of what generates it."""
  params = {'format': _CACHE_FORMAT, 'kind': kind,
            'config': dataclasses.asdict(config)}
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
  return os.path.join(cache_dir or default_cache_dir(),
                      f'speech_keywords_{kind}_{key.hexdigest()[:20]}.npz')


def _checksum(arrays: dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for name in sorted(arrays):
    arr = np.ascontiguousarray(arrays[name])
    digest.update(f'{name}:{arr.dtype.str}:{arr.shape};'.encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


def _read_cache(path: str) -> dict[str, np.ndarray]:
  """Loads a cache file; raises if it is unreadable or fails its checksum."""
  with np.load(path, allow_pickle=False) as npz:
    arrays = {name: npz[name] for name in npz.files}
  stored = str(arrays.pop('sha256', ''))
  if _checksum(arrays) != stored:
    raise ValueError('sha256 of the arrays does not match the stored one')
  return arrays


def _write_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes atomically: a temporary file in the same folder, then rename."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, sha256=np.array(_checksum(arrays)), **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shareable.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _load(config: SpeechCorpusConfig, cache_dir: str | None, kind: str,
          num_workers: int | None) -> ArrayDataset:
  """Reads the cache, or (re)builds and writes it."""
  path = cache_path(config, cache_dir, kind)
  arrays = None
  if os.path.exists(path):
    try:
      arrays = _read_cache(path)
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f'Speech keyword cache {path} is corrupt ({e!r}); '
                    'rebuilding it.')
  if arrays is None:
    logging.info('Synthesising speech keywords into %s.', path)
    if num_workers is None:
      # Spawning costs seconds, so small corpora stay in this process.
      num_workers = 1 if config.num_speakers < 20 else min(
          _MAX_WORKERS, os.cpu_count() or 1)
    arrays = _build(config, kind, num_workers)
    _write_cache(path, arrays)
  return _to_dataset(config, arrays)


def _to_dataset(config: SpeechCorpusConfig,
                arrays: dict[str, np.ndarray]) -> ArrayDataset:
  """Adds the speaker columns and info to cached arrays."""
  speakers = corpus_speakers(config)
  group = np.array([ACCENT_NAMES.index(s.accent_group) for s in speakers],
                   np.int32)[arrays['client_id']]
  outlier_ids = [ACCENT_NAMES.index(n) for n in OUTLIER_ACCENTS]
  x = arrays['x']
  return ArrayDataset(
      x=x.astype(np.float32) if x.dtype == np.float16 else x,
      y=arrays['y'], client_id=arrays['client_id'],
      class_names=tuple(config.words),
      meta={'accent_group': group,
            'is_outlier_accent': np.isin(group, outlier_ids),
            'utterance': arrays['utterance']},
      info={'accent_groups': ACCENT_NAMES,
            'outlier_accent_groups': OUTLIER_ACCENTS,
            'speakers': [dict(dataclasses.asdict(s), index=i,
                              is_outlier_accent=s.is_outlier_accent)
                         for i, s in enumerate(speakers)],
            'config': dataclasses.asdict(config),
            'espeak_version': str(arrays['espeak_version'])})


def load_speech_keywords(config: SpeechCorpusConfig = SpeechCorpusConfig(),
                         cache_dir: str | None = None,
                         num_workers: int | None = None) -> ArrayDataset:
  """Log-mel speech keywords, synthesised on first use and then cached.

  Args:
    config: what to synthesise.
    cache_dir: cache folder; default $ONDEVICE_CACHE or ~/.cache/ondevice.
    num_workers: processes that synthesise when the cache is missing
      (spawned, so a calling script needs an `if __name__ == '__main__'`
      guard); default up to 4 cores for 20 or more speakers, else 1. The
      clips do not depend on it.

  Returns:
    ArrayDataset with x float32 [N, 98, 40] log-mel (`audio.log_mel`, stored
    as float16), y the index of the word in config.words, client_id the
    speaker, meta 'accent_group' (index into info['accent_groups']),
    'is_outlier_accent' and 'utterance', and info with the speakers and the
    config. N = num_speakers * len(words) * utterances_per_word, ordered by
    speaker, then word, then utterance.
  """
  return _load(config, cache_dir, 'log_mel', num_workers)


def load_speech_waveforms(config: SpeechCorpusConfig = SpeechCorpusConfig(),
                          cache_dir: str | None = None,
                          num_workers: int | None = None) -> ArrayDataset:
  """The same clips as `load_speech_keywords` as raw audio.

  Returns:
    ArrayDataset whose x is int16 [N, 16000] at 16 kHz (divide by 32768
    before `audio.log_mel`); other columns as in `load_speech_keywords`. The
    default corpus takes 0.7 GB.
  """
  return _load(config, cache_dir, 'waveform', num_workers)


def load_corpus(config: SpeechCorpusConfig = SpeechCorpusConfig(),
                population=None, cache_dir: str | None = None,
                num_workers: int | None = None) -> ArrayDataset:
  """The pre-training corpus of a population, by `config.data.population`.

  Args:
    config: what to synthesise.
    population: None, '' or 'espeak': this module's eSpeak corpus, exactly
      `load_speech_keywords(config)`; otherwise a population name or mapping
      (see `population.population_from_config`), validated before anything
      is synthesised, whose seen speakers among 0..num_speakers-1 form the
      corpus (`population_corpus.load_population_keywords`).
    cache_dir: cache folder; default $ONDEVICE_CACHE or ~/.cache/ondevice.
    num_workers: synthesis processes, as in `load_speech_keywords`.
  """
  # pylint: disable=g-import-not-at-top
  from ondevice.data import population as population_lib
  from ondevice.data import population_corpus
  pop = population_lib.population_from_config(population,
                                              'config.data.population')
  if pop is None:
    return load_speech_keywords(config, cache_dir, num_workers)
  return population_corpus.load_population_keywords(config, pop, cache_dir,
                                                    num_workers)
