"""Speakers of a `population.Population`, their clips, and cached corpora.

A speaker is a deterministic function of its seed (`make_speaker`): a
family, voice and timbre, one room (source, microphone, RT60), one device
microphone and one kind of background noise. A clip of (seed, speaker,
word, utterance) draws its own jitter from
`np.random.default_rng((seed, speaker, word, utterance))`, like the eSpeak
corpus: the speaking rate and f0 vary a little, the word is placed at a
random position and level, and noise is added at a random SNR within the
speaker's range. The signal chain of a clip is

    engine (16 kHz) -> timbre (f0, vocal-tract length) -> trim silence
    -> room impulse response -> level and position in 1 s -> + noise
    -> microphone response -> int16

The corpus config's `level` and `rate_jitter` apply as in the eSpeak corpus;
its `snr_db` and `pitch_jitter` (eSpeak pitch units) do not: the SNR range
is the speaker's noise condition's, and the f0 jitter is the population's
`f0_jitter_semitones`. The room impulse response is computed once per
speaker. Engines other than
eSpeak NG are stateless, so only the requested words are spoken; eSpeak NG
speaks the whole vocabulary in a fixed order after a reset, so that a clip
never depends on `config.words` (a corpus of fewer words is a subset).

Corpora are cached like the eSpeak corpus, under a key that covers the
corpus config, the population, the speaker indices, the engines' and the
voices' versions, and the versions of scipy and pyroomacoustics (which
compute the resampling filters and the impulse responses).

This module synthesises a population's speakers and clips only: the
pre-training corpus (`load_population_keywords`) and any speakers' clips
(`load_speakers`). New users (picking typical and unseen users, their
enrollment and evaluation clips, normalisation) come from
`ondevice.user_corpus` with `population=` set, as for the eSpeak corpus.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import NamedTuple

from absl import logging
import numpy as np
import scipy
from scipy import signal

from ondevice.data import engines
from ondevice.data import population as pop_lib
from ondevice.data import rooms
from ondevice.data import speech_keywords as sk
from ondevice.data import timbre
from ondevice.data.base import ArrayDataset
from ondevice.data.engines import espeak_engine

_CACHE_FORMAT = 1          # bump when the arrays' meaning changes
_MIC_HEIGHT = (0.7, 1.8)   # metres, where a drawn microphone sits
_PLACEMENT_TRIES = 100


@dataclasses.dataclass(frozen=True)
class PopulationSpeaker:
  """A speaker of a population: voice, timbre and recording conditions."""
  seed: int
  family: str
  engine: str
  voice: str
  timbre: str
  f0_factor: float          # f0 multiplier, 2 ** (semitones / 12)
  vtl_factor: float         # formant multiplier (> 1: shorter tract)
  stretch: float            # duration multiplier (> 1: slower)
  room_condition: str
  room: rooms.Room
  mic_condition: str
  mic: rooms.Mic
  noise_condition: str
  noise_kind: str
  snr_db: tuple[float, float]
  unseen: bool              # family or a condition held out of pre-training


def _draw(rng: np.random.Generator, entries):
  weights = np.array([e.weight for e in entries], np.float64)
  return entries[rng.choice(len(entries), p=weights / weights.sum())]


def _uniform(rng: np.random.Generator, bounds) -> float:
  return float(rng.uniform(bounds[0], bounds[1]))


def _draw_room(rng: np.random.Generator,
               condition: pop_lib.RoomCondition) -> rooms.Room:
  """A room of the condition with source and microphone inside it.

  The source lies at the drawn distance from the microphone, towards a
  random point of the room; if that never fits, towards the farthest corner
  (and no farther than it).
  """
  size = rng.uniform(condition.size_low, condition.size_high)
  rt60 = _uniform(rng, condition.rt60)
  distance = _uniform(rng, condition.distance)
  low, high = np.full(3, pop_lib.MARGIN_M), size - pop_lib.MARGIN_M
  for _ in range(_PLACEMENT_TRIES):
    if condition.mic is None:
      mic = rng.uniform(low, high)
      mic[2] = rng.uniform(_MIC_HEIGHT[0], min(_MIC_HEIGHT[1], high[2]))
    else:
      mic = np.asarray(condition.mic, np.float64)
    towards = rng.uniform(low, high) - mic
    source = mic + distance * towards / max(np.linalg.norm(towards), 1e-9)
    if np.all(source > low) and np.all(source < high):
      break
  else:
    corners = np.array([[a, b, c] for a in (low[0], high[0])
                        for b in (low[1], high[1]) for c in (low[2], high[2])])
    far = corners[np.argmax(np.linalg.norm(corners - mic, axis=1))]
    towards = far - mic
    source = mic + min(distance, 0.99 * np.linalg.norm(towards)) * (
        towards / np.linalg.norm(towards))
  return rooms.Room(tuple(map(float, size)), rt60, tuple(map(float, source)),
                    tuple(map(float, mic)))


def make_speaker(pop: pop_lib.Population, seed: int) -> PopulationSpeaker:
  """Draws a speaker of `pop`; a deterministic function of `seed`."""
  rng = np.random.default_rng(seed)
  family = _draw(rng, pop.families)
  voice = family.voices[rng.integers(len(family.voices))]
  if family.engine == espeak_engine.NAME:
    voice += '+' + espeak_engine.VARIANTS[
        rng.integers(len(espeak_engine.VARIANTS))]
  kind = _draw(rng, pop.timbres)
  f0_factor = 2.0 ** (_uniform(rng, kind.f0_semitones) / 12.0)
  vtl_factor, stretch = (_uniform(rng, kind.vtl_factor),
                         _uniform(rng, kind.stretch))
  room_condition = _draw(rng, pop.rooms)
  room = _draw_room(rng, room_condition)
  mic_condition = _draw(rng, pop.mics)
  mic = rooms.Mic(_uniform(rng, mic_condition.low_hz),
                  _uniform(rng, mic_condition.high_hz),
                  _uniform(rng, mic_condition.tilt_db_per_octave))
  noise = _draw(rng, pop.noises)
  noise_kind = noise.kinds[rng.integers(len(noise.kinds))]
  conditions = (kind.name, room_condition.name, mic_condition.name,
                noise.name)
  unseen = (family.name in pop.held_out_families or
            any(c in pop.held_out_conditions for c in conditions))
  return PopulationSpeaker(
      int(seed), family.name, family.engine, voice, kind.name, f0_factor,
      vtl_factor, stretch, room_condition.name, room, mic_condition.name,
      mic, noise.name, noise_kind, tuple(map(float, noise.snr_db)), unseen)


def speaker_at(pop: pop_lib.Population, corpus_seed: int,
               index: int) -> PopulationSpeaker:
  """Speaker `index` of the corpus with seed `corpus_seed`."""
  return make_speaker(pop, sk.speaker_seed(corpus_seed, index))


class _Request(NamedTuple):
  """One clip to speak, with the jitter drawn from its own generator."""
  word_index: int           # index into sk.WORDS
  utterance: int
  f0_factor: float
  engine_stretch: float
  noise_seed: int
  rng: np.random.Generator  # continues with the clip's placement and noise


def _requests(config: sk.SpeechCorpusConfig, pop: pop_lib.Population,
              speaker: PopulationSpeaker, index: int) -> list[_Request]:
  """Clips in speaking order: utterance-major over the vocabulary."""
  all_words = speaker.engine == espeak_engine.NAME  # Engine keeps state.
  out = []
  for utt in range(config.utterances_per_word):
    for word_index, word in enumerate(sk.WORDS):
      if not (all_words or word in config.words):
        continue
      rng = np.random.default_rng((config.seed, index, word_index, utt))
      stretch = speaker.stretch * np.exp(config.rate_jitter *
                                         rng.standard_normal())
      stretch /= sk._PHRASE_SPEEDUP if word == sk.WAKE_PHRASE else 1.0  # pylint: disable=protected-access
      f0 = speaker.f0_factor * 2.0 ** (
          pop.f0_jitter_semitones * rng.standard_normal() / 12.0)
      # Timbre's resampling shortens the clip by f0: ask for it longer.
      out.append(_Request(word_index, utt, f0, stretch * f0,
                          int(rng.integers(2**32)), rng))
  return out


def _trim(x: np.ndarray) -> np.ndarray:
  peak = np.max(np.abs(x))
  if peak == 0.0:
    raise RuntimeError('the engine returned silence.')
  loud = np.flatnonzero(np.abs(x) > sk._TRIM_LEVEL * peak)  # pylint: disable=protected-access
  return x[loud[0]:loud[-1] + 1]


def render_clip(raw: np.ndarray, request: _Request, rir: np.ndarray,
                speaker: PopulationSpeaker,
                config: sk.SpeechCorpusConfig) -> np.ndarray:
  """Engine samples -> a 1 s int16 clip through the speaker's conditions."""
  rng = request.rng
  dry = _trim(timbre.apply_timbre(raw / 32768.0, request.f0_factor,
                                  speaker.vtl_factor))
  wet = signal.fftconvolve(dry, rir)
  wet *= rng.uniform(*config.level) / np.max(np.abs(wet))
  n = sk.CLIP_SAMPLES
  if len(dry) > n:  # Too long: keep a random 1 s window of the word.
    start = rng.integers(len(dry) - n + 1)
    wet, offset = wet[start:start + n], 0
  else:
    offset = int(rng.integers(n - len(dry) + 1))
  clip = np.zeros(n)
  clip[offset:offset + len(wet)] = wet[:n - offset]
  speech = clip[offset:offset + min(len(dry), n)]
  noise_power = np.mean(speech ** 2) / 10.0 ** (rng.uniform(*speaker.snr_db)
                                                / 10.0)
  clip += np.sqrt(noise_power) * rooms.background_noise(rng, n,
                                                        speaker.noise_kind)
  clip = rooms.apply_mic(clip, speaker.mic)
  return np.clip(np.round(clip * 32767.0), -32768, 32767).astype(np.int16)


def synthesize_speaker(config: sk.SpeechCorpusConfig,
                       pop: pop_lib.Population,
                       index: int) -> dict[str, np.ndarray]:
  """All clips of speaker `index`, like `speech_keywords.synthesize_speaker`.

  Returns:
    {'waveform': int16 [n, 16000], 'y': label in config.words,
     'utterance': [n]} in (word, utterance) order.
  """
  speaker = speaker_at(pop, config.seed, index)
  requests = _requests(config, pop, speaker, index)
  raws = engines.ENGINES[speaker.engine].speak_many(
      [sk.WORDS[r.word_index] for r in requests], speaker.voice,
      [r.engine_stretch for r in requests], [r.noise_seed for r in requests])
  rir = rooms.impulse_response(speaker.room)
  clips = {}
  for raw, request in zip(raws, requests):
    word = sk.WORDS[request.word_index]
    if word in config.words:
      clips[config.words.index(word), request.utterance] = render_clip(
          raw, request, rir, speaker, config)
  keys = sorted(clips)
  return {'waveform': np.stack([clips[k] for k in keys]),
          'y': np.array([k[0] for k in keys], np.int32),
          'utterance': np.array([k[1] for k in keys], np.int32)}


def seen_indices(config: sk.SpeechCorpusConfig,
                 pop: pop_lib.Population) -> list[int]:
  """Pre-training speakers: indices < num_speakers that are not unseen."""
  return [i for i in range(config.num_speakers)
          if not speaker_at(pop, config.seed, i).unseen]


@functools.lru_cache(maxsize=None)
def _engine_version(name: str) -> str:
  return engines.ENGINES[name].version()


def cache_path(config: sk.SpeechCorpusConfig, pop: pop_lib.Population,
               indices: list[int], kind: str = 'log_mel',
               cache_dir: str | None = None) -> str:
  """Cache file of these speakers: a hash of everything behind the arrays."""
  import pyroomacoustics  # pylint: disable=g-import-not-at-top
  used = sorted({f.engine for f in pop.families})
  params = {'format': _CACHE_FORMAT, 'kind': kind,
            'config': dataclasses.asdict(config),
            'population': dataclasses.asdict(pop),
            'indices': [int(i) for i in indices],
            'engines': {name: _engine_version(name) for name in used},
            'scipy': scipy.__version__,
            'pyroomacoustics': pyroomacoustics.__version__}
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
  return os.path.join(cache_dir or sk.default_cache_dir(),
                      f'speech_population_{kind}_{key.hexdigest()[:20]}.npz')


def _build(config: sk.SpeechCorpusConfig, pop: pop_lib.Population,
           indices: list[int], kind: str,
           num_workers: int) -> dict[str, np.ndarray]:
  job = functools.partial(synthesize_speaker, config, pop)
  parts = []
  for index, clips in sk._speaker_chunks(config, num_workers, job, indices):  # pylint: disable=protected-access
    wave = clips.pop('waveform')
    clips['x'] = sk.log_mel_int16(wave) if kind == 'log_mel' else wave
    clips['client_id'] = np.full(len(wave), index, np.int32)
    parts.append(clips)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def load_speakers(config: sk.SpeechCorpusConfig, pop: pop_lib.Population,
                  indices: list[int], cache_dir: str | None = None,
                  num_workers: int | None = None,
                  kind: str = 'log_mel') -> ArrayDataset:
  """Clips of the speakers `indices` (seen or not), cached.

  Returns:
    ArrayDataset with x float32 [N, 98, 40] log-mel (or int16 [N, 16000]
    for kind 'waveform'), y the index in config.words, client_id the speaker
    index, and meta columns 'family', 'timbre', 'room', 'mic', 'noise'
    (indices into info's name lists), 'is_unseen', 'utterance', and, for
    code written for the eSpeak corpus, 'accent_group' (= 'family') and
    'is_outlier_accent' (= 'is_unseen').
  """
  if not indices:
    raise ValueError('load_speakers needs at least one speaker index.')
  path = cache_path(config, pop, indices, kind, cache_dir)
  arrays = None
  if os.path.exists(path):
    try:
      arrays = sk._read_cache(path)  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Population cache %s is corrupt (%r); rebuilding.',
                      path, e)
  if arrays is None:
    logging.info('Synthesising %d speakers of population %s into %s.',
                 len(indices), pop.name, path)
    if num_workers is None:
      num_workers = 1 if len(indices) < 8 else min(4, os.cpu_count() or 1)
    arrays = _build(config, pop, list(indices), kind, num_workers)
    sk._write_cache(path, arrays)  # pylint: disable=protected-access
  return _to_dataset(config, pop, arrays, indices)


def _to_dataset(config: sk.SpeechCorpusConfig, pop: pop_lib.Population,
                arrays: dict[str, np.ndarray],
                indices: list[int]) -> ArrayDataset:
  speakers = {int(i): speaker_at(pop, config.seed, int(i)) for i in indices}
  tables = {'family': ('family', pop.families),
            'timbre': ('timbre', pop.timbres),
            'room': ('room_condition', pop.rooms),
            'mic': ('mic_condition', pop.mics),
            'noise': ('noise_condition', pop.noises)}
  client = arrays['client_id']
  meta = {}
  for column, (field, entries) in tables.items():
    names = [e.name for e in entries]
    per_speaker = {i: names.index(getattr(s, field))
                   for i, s in speakers.items()}
    meta[column] = np.array([per_speaker[int(c)] for c in client], np.int32)
  meta['is_unseen'] = np.array([speakers[int(c)].unseen for c in client])
  meta['accent_group'] = meta['family']
  meta['is_outlier_accent'] = meta['is_unseen']
  meta['utterance'] = arrays['utterance']
  x = arrays['x']
  return ArrayDataset(
      x=x.astype(np.float32) if x.dtype == np.float16 else x,
      y=arrays['y'], client_id=client, class_names=tuple(config.words),
      meta=meta,
      info={'population': dataclasses.asdict(pop),
            'names': {c: tuple(e.name for e in t[1])
                      for c, t in tables.items()},
            'accent_groups': tuple(f.name for f in pop.families),
            'speakers': [dict(dataclasses.asdict(s), index=i)
                         for i, s in speakers.items()],
            'config': dataclasses.asdict(config)})


def load_population_keywords(config: sk.SpeechCorpusConfig,
                             pop: pop_lib.Population,
                             cache_dir: str | None = None,
                             num_workers: int | None = None,
                             kind: str = 'log_mel') -> ArrayDataset:
  """The pre-training corpus: the seen speakers among 0..num_speakers-1."""
  indices = seen_indices(config, pop)
  if len(indices) < 2:
    raise ValueError(f'Population {pop.name!r} has {len(indices)} seen '
                     f'speakers among {config.num_speakers}; raise '
                     'config.data.num_speakers or hold out less.')
  return load_speakers(config, pop, indices, cache_dir, num_workers, kind)

