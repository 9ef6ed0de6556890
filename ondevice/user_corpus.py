"""New users: speakers no pre-training saw, with clips to enroll and evaluate.

The one entry point for new users of every speaker population: the eSpeak
corpus of `ondevice.data.speech_keywords` (population None or 'espeak', the
default) and the multi-engine populations of `ondevice.data.population`
('mixed', 'mixed_unseen' or a mapping of overrides, as in
`config.data.population`), whose clips `ondevice.data.population_corpus`
synthesises.

The shared speech corpus (`ondevice.data.speech_keywords`) speaks each word
a few times per speaker, too few to enroll a user and still hold clips out.
New users are speakers of the same synthetic population with indices at or
above `first_index` (the pre-training corpus has speakers 0..num_speakers-1,
so none of them was seen in pre-training), each saying every word
`UserClips.utterances_per_word` times. A user's keyword clip of (word,
utterance) is exactly the one a corpus holding that speaker would contain,
since it comes from `speech_keywords.synthesize_speaker`. Optionally a user
also has what a device hears besides keywords: out-of-vocabulary words in
the same voice (`OTHER_WORDS`) and noise-only clips.

API:

    corpus = user_corpus.corpus_config(config.data)   # seed, words, ...
    population = config.data.get('population', None)  # None = 'espeak'
    indices = user_corpus.pick_users(corpus, first_index=200,
                                     num_typical=4, num_outlier=4,
                                     population=population)
    users = user_corpus.load_users(corpus, indices, UserClips(
        utterances_per_word=8, other_utterances=0, num_noise=0),
        population=population)
    users = user_corpus.normalise_like(users, train_ds)
    users.keywords      # ArrayDataset: x [N, 98, 40] log-mel, y over
                        # corpus.words, client_id = speaker index, meta
                        # 'accent_group', 'is_outlier_accent', 'utterance'
    users.other_words   # ArrayDataset, y over OTHER_WORDS, meta 'utterance'
    users.noise         # ArrayDataset, one class 'noise'
    users.of_user(i)    # the same three sets restricted to speaker i

* `pick_users` is the one way to choose users: typical and outlier
  speakers in the numbers asked for, a deterministic function of the corpus
  seed. In the eSpeak population an outlier has a rare accent
  (`speech_keywords.OUTLIER_ACCENTS`, rare by construction, so indices are
  scanned upwards) and accents are spread; in a multi-engine population an
  outlier is unseen (its family or a condition is held out of pre-training,
  `population_corpus.PopulationSpeaker.unseen`) and families are spread.
* A multi-engine population's users have keyword clips (cached by
  `population_corpus.load_speakers`, one file per set of users; meta also
  holds 'family', 'room', 'mic', 'noise', 'timbre', 'is_unseen') and
  noise-only clips, the same as an eSpeak user's of that index; other words
  are spoken by the eSpeak population only.
* One cache file per user (`cache_path`), named by a hash of everything that
  generates it and holding a sha256 of its arrays (written and checked like
  the corpus's, by `speech_keywords`). A cache file that cannot
  be read or fails its checksum is logged as a warning and rebuilt.
* Speakers and clips come from `speech_keywords`' public functions only
  (`make_speaker`, `speaker_seed`, `synthesize_speaker`, `place_in_clip`),
  through `_speaker` and `_synthesize`, so a speaker-population option can
  later be passed through `corpus_config` and those two functions.
* Features are raw log-mel (`speech_keywords.log_mel_int16`);
  `normalise_like` standardises every set with a training split's
  statistics, the one normalisation callers use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from typing import Any

from absl import logging
import numpy as np

from ondevice.data import espeak
from ondevice.data import population as pop_lib
from ondevice.data import population_corpus
from ondevice.data import speech_keywords as sk
from ondevice.data.base import ArrayDataset

# Everyday words that are not keywords and sound unlike all of them.
OTHER_WORDS = (
    'hello', 'water', 'kitchen', 'music', 'today', 'please', 'window',
    'coffee', 'tomorrow', 'garden', 'yellow', 'number', 'morning', 'dinner',
    'paper', 'button', 'river', 'silver', 'table', 'pocket', 'orange',
    'weather', 'little', 'picture')
NOISE_LEVEL = (0.002, 0.05)  # RMS of noise-only clips, full scale 1.
NOISE_CLASSES = ('noise',)
_OTHER_WORD_OFFSET = 1000    # Keeps rng streams apart from the keywords'.
_NOISE_OFFSET = 2000
_CACHE_FORMAT = 1            # Bump when the arrays' meaning changes.
_FEATURE_SHAPE = (98, 40)
_CANDIDATES_PER_USER = 8     # Scan depth of `pick_users(spread_accents=True)`.
POPULATION_KEY = 'config.data.population'


@dataclasses.dataclass(frozen=True)
class UserClips:
  """Which clips each new user has; every field enters the cache key.

  Attributes:
    utterances_per_word: clips of every word of the corpus (>= 2: one to
      enroll, one to evaluate).
    other_utterances: clips of every word in `OTHER_WORDS` (0 = none).
    num_noise: noise-only clips (0 = none).
  """
  utterances_per_word: int = 20
  other_utterances: int = 0
  num_noise: int = 0

  def __post_init__(self):
    if self.utterances_per_word < 2:
      raise ValueError('UserClips.utterances_per_word must be >= 2 (one to '
                       f'enroll, one to evaluate); got '
                       f'{self.utterances_per_word}.')
    if self.other_utterances < 0 or self.num_noise < 0:
      raise ValueError('UserClips.other_utterances and num_noise must be '
                       f'>= 0; got {self.other_utterances} and '
                       f'{self.num_noise}.')


@dataclasses.dataclass(frozen=True)
class NewUsers:
  """Clips of new users; every set's client_id is the speaker index."""
  keywords: ArrayDataset
  other_words: ArrayDataset
  noise: ArrayDataset

  @property
  def indices(self) -> list[int]:
    """Speaker indices in the order they were loaded."""
    return [s['index'] for s in self.keywords.info['speakers']]

  def speaker(self, index: int) -> dict[str, Any]:
    """The speaker record (accent group, voice, ...) of user `index`."""
    for record in self.keywords.info['speakers']:
      if record['index'] == index:
        return record
    raise KeyError(f'User {index} is not one of {self.indices}.')

  def of_user(self, index: int) -> NewUsers:
    """The clips of user `index` only."""
    self.speaker(index)  # Raises for an unknown user.
    return NewUsers(*(ds.take(ds.client_id == index) for ds in
                      (self.keywords, self.other_words, self.noise)))


def corpus_config(data_config) -> sk.SpeechCorpusConfig:
  """The speech population of a `config.data` (name 'speech_keywords')."""
  if data_config.get('name', 'speech_keywords') != 'speech_keywords':
    raise ValueError(f'config.data.name={data_config.name!r}: new users need '
                     "'speech_keywords'.")
  kwargs = dict(num_speakers=data_config.num_speakers,
                utterances_per_word=data_config.utterances_per_word,
                seed=data_config.corpus_seed)
  if data_config.get('words', None):
    kwargs['words'] = tuple(data_config.words)
  return sk.SpeechCorpusConfig(**kwargs)


def resolve_population(population) -> pop_lib.Population | None:
  """None for the eSpeak population, else the `population.Population`.

  Args:
    population: None, '' or 'espeak'; a name in `population.POPULATIONS`; a
      mapping of overrides (see `population.population_from_config`, whose
      errors name `config.data.population`); or a Population itself.
  """
  if isinstance(population, pop_lib.Population):
    return population
  return pop_lib.population_from_config(population, POPULATION_KEY)


def _speaker(corpus: sk.SpeechCorpusConfig, index: int) -> sk.Speaker:
  return sk.make_speaker(sk.speaker_seed(corpus.seed, index))


def _kind(corpus: sk.SpeechCorpusConfig, pop: pop_lib.Population | None,
          index: int) -> tuple[bool, str]:
  """(is outlier, group to spread over) of speaker `index`."""
  if pop is None:
    speaker = _speaker(corpus, index)
    return speaker.is_outlier_accent, speaker.accent_group
  speaker = population_corpus.speaker_at(pop, corpus.seed, index)
  return speaker.unseen, speaker.family


def _candidates(corpus, first_index, wanted, max_scan, pop=None
                ) -> dict[bool, list[tuple[int, str]]]:
  """(index, group) of typical (False) and outlier (True) speakers."""
  found = {False: [], True: []}
  for index in range(first_index, first_index + max_scan):
    outlier, group_name = _kind(corpus, pop, index)
    group = found[outlier]
    if len(group) < wanted[outlier]:
      group.append((index, group_name))
    if all(len(found[k]) >= wanted[k] for k in found):
      return found
  return found


def _spread(candidates: list[tuple[int, str]], count: int) -> list[int]:
  """Round robin over accent groups, in order of their first speaker."""
  by_group: dict[str, list[int]] = {}
  for index, group in candidates:
    by_group.setdefault(group, []).append(index)
  picked = []
  for rank in range(max(map(len, by_group.values()), default=0)):
    for members in by_group.values():  # Dicts keep insertion order.
      if rank < len(members) and len(picked) < count:
        picked.append(members[rank])
  return picked


def _check_pick(corpus: sk.SpeechCorpusConfig, pop, first_index: int,
                num_typical: int, num_outlier: int) -> None:
  """Raises ValueError for counts or a first index no scan can satisfy."""
  if num_typical < 0 or num_outlier < 0 or num_typical + num_outlier == 0:
    raise ValueError('num_typical and num_outlier must be >= 0 and not both '
                     f'0; got {num_typical} and {num_outlier}.')
  if first_index < corpus.num_speakers:
    raise ValueError(f'first_index={first_index} is a speaker of the '
                     f'{corpus.num_speakers}-speaker corpus; new users need '
                     f'first_index >= {corpus.num_speakers}.')
  if (pop is not None and num_outlier and not pop.held_out_families and
      not pop.held_out_conditions):
    raise ValueError(
        f'{POPULATION_KEY}={pop.name!r} holds nothing out of pre-training, '
        f'so it has no outlier (unseen) users; got num_outlier={num_outlier}. '
        "Ask for 0 or use a population with held-out families or "
        "conditions, such as 'mixed_unseen'.")


def pick_users(corpus: sk.SpeechCorpusConfig, first_index: int,
               num_typical: int, num_outlier: int,
               spread_accents: bool = True, max_scan: int = 5000,
               population=None) -> list[int]:
  """Speaker indices >= first_index: num_typical typical, num_outlier outliers.

  Args:
    corpus: seed and size of the corpus; speakers are a function of
      corpus.seed, and first_index must be >= corpus.num_speakers (unseen in
      pre-training).
    first_index: the first index to consider.
    num_typical: speakers of common accents (a population: seen speakers).
    num_outlier: speakers of rare accents (`speech_keywords.OUTLIER_ACCENTS`;
      a population: unseen speakers, see the module docstring).
    spread_accents: False takes the first speakers of each kind in index
      order; True takes, among the first `_CANDIDATES_PER_USER` times as many,
      one per accent group (a population: family) before any group twice.
    max_scan: how many indices to scan at most.
    population: see `resolve_population`; None is the eSpeak population.

  Returns:
    spread_accents: the typical users, then the outlier users, each in the
    order picked; else all of them in increasing index order.

  Raises:
    ValueError: bad counts, first_index inside the corpus, a population with
      no outliers, or too few speakers of a kind within max_scan indices.
  """
  pop = resolve_population(population)
  _check_pick(corpus, pop, first_index, num_typical, num_outlier)
  counts = {False: num_typical, True: num_outlier}
  depth = _CANDIDATES_PER_USER if spread_accents else 1
  found = _candidates(corpus, first_index,
                      {k: n * depth for k, n in counts.items()}, max_scan,
                      pop)
  picked = []
  for outlier, count in counts.items():
    if len(found[outlier]) < count:
      kind = 'outlier' if outlier else 'typical'
      raise ValueError(
          f'Found only {len(found[outlier])} {kind} speakers in {max_scan} '
          f'indices from {first_index}; ask for at most that many '
          f'(num_{kind}).')
    picked += (_spread(found[outlier], count) if spread_accents else
               [index for index, _ in found[outlier][:count]])
  return picked if spread_accents else sorted(picked)


def _other_word_clips(corpus: sk.SpeechCorpusConfig, index: int,
                      clips: UserClips) -> tuple[list[np.ndarray], list, list]:
  """OTHER_WORDS in the user's voice; continues the keywords' engine state."""
  speaker = _speaker(corpus, index)
  waves, words, utts = [], [], []
  for utt in range(clips.other_utterances):
    for j, word in enumerate(OTHER_WORDS):
      rng = np.random.default_rng(
          (corpus.seed, index, _OTHER_WORD_OFFSET + j, utt))
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
  return waves, words, utts


def _noise_clip(rng: np.random.Generator) -> np.ndarray:
  rms = np.exp(rng.uniform(*np.log(NOISE_LEVEL)))
  noise = rms * sk.coloured_noise(rng, sk.CLIP_SAMPLES,
                                  rng.choice([0.0, 1.0, 2.0]))
  return np.clip(np.round(noise * 32767.0), -32768, 32767).astype(np.int16)


def _features(waves: list[np.ndarray] | np.ndarray) -> np.ndarray:
  if not len(waves):
    return np.zeros((0,) + _FEATURE_SHAPE, np.float16)
  return sk.log_mel_int16(np.stack(waves))


def _user_corpus(corpus: sk.SpeechCorpusConfig, index: int,
                 clips: UserClips) -> sk.SpeechCorpusConfig:
  return dataclasses.replace(corpus, num_speakers=index + 1,
                             utterances_per_word=clips.utterances_per_word)


def _noise_features(corpus: sk.SpeechCorpusConfig, index: int,
                    clips: UserClips) -> np.ndarray:
  """Log-mel of user `index`'s noise-only clips (any population)."""
  return _features([_noise_clip(np.random.default_rng(
      (corpus.seed, index, _NOISE_OFFSET, i))) for i in range(clips.num_noise)])


def _synthesize(corpus: sk.SpeechCorpusConfig, index: int,
                clips: UserClips) -> dict[str, np.ndarray]:
  """Log-mel (float16) keywords, other words and noise of one user."""
  # A fixed order (keywords, then other words, then noise) keeps the engine's
  # hidden state, and so every clip, deterministic.
  keywords = sk.synthesize_speaker(_user_corpus(corpus, index, clips), index)
  waves, words, utts = _other_word_clips(corpus, index, clips)
  return {'keyword_x': _features(keywords['waveform']),
          'keyword_y': keywords['y'], 'keyword_utt': keywords['utterance'],
          'other_x': _features(waves),
          'other_word': np.array(words, np.int32),
          'other_utt': np.array(utts, np.int32),
          'noise_x': _noise_features(corpus, index, clips)}


def cache_path(corpus: sk.SpeechCorpusConfig, index: int, clips: UserClips,
               cache_dir: str | None = None) -> str:
  """The cache file of one user: named by a hash of what generates it."""
  key = json.dumps({'format': _CACHE_FORMAT,
                    'corpus': dataclasses.asdict(
                        _user_corpus(corpus, index, clips)),
                    'clips': dataclasses.asdict(clips),
                    'other_words': OTHER_WORDS, 'noise': NOISE_LEVEL},
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(cache_dir or sk.default_cache_dir(),
                      f'new_user_{index}_{digest}.npz')


def load_user_arrays(corpus: sk.SpeechCorpusConfig, index: int,
                     clips: UserClips, cache_dir: str | None = None
                     ) -> dict[str, np.ndarray]:
  """One user's cached arrays (float16 log-mel), synthesised when missing.

  Returns:
    {'keyword_x', 'keyword_y' (over corpus.words), 'keyword_utt', 'other_x',
     'other_word' (over OTHER_WORDS), 'other_utt', 'noise_x'}.
  """
  path = cache_path(corpus, index, clips, cache_dir)
  if os.path.exists(path):
    try:
      return sk._read_cache(path)  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('New-user cache %s is corrupt (%r); rebuilding it.',
                      path, e)
  logging.info('Synthesising new user %d into %s.', index, path)
  arrays = _synthesize(corpus, index, clips)
  sk._write_cache(path, arrays)  # pylint: disable=protected-access
  return arrays


def _dataset(parts: list[dict[str, np.ndarray]], x: str, y: str,
             classes: tuple[str, ...], meta: dict[str, str],
             info: dict[str, Any]) -> ArrayDataset:
  """Concatenates the users' `x` rows into one ArrayDataset."""
  cat = lambda k: np.concatenate([p[k] for p in parts])
  feats = cat(x)
  labels = cat(y) if y else np.zeros(len(feats), np.int32)
  return ArrayDataset(
      x=feats.astype(np.float32), y=labels.astype(np.int32),
      client_id=cat('client_id_' + x).astype(np.int32), class_names=classes,
      meta={name: cat(key) for name, key in meta.items()}, info=info)


def _annotate(arrays: dict[str, np.ndarray], index: int,
              speaker: sk.Speaker) -> dict[str, np.ndarray]:
  """Adds per-row client and accent columns to one user's arrays."""
  out = dict(arrays)
  for x in ('keyword_x', 'other_x', 'noise_x'):
    out['client_id_' + x] = np.full(len(arrays[x]), index, np.int32)
  n = len(arrays['keyword_x'])
  out['accent_group'] = np.full(
      n, sk.ACCENT_NAMES.index(speaker.accent_group), np.int32)
  out['is_outlier_accent'] = np.full(n, speaker.is_outlier_accent)
  return out


def load_users(corpus: sk.SpeechCorpusConfig, indices: list[int],
               clips: UserClips = UserClips(),
               cache_dir: str | None = None, population=None) -> NewUsers:
  """Raw log-mel clips of the users `indices` (see the module docstring).

  `population` (see `resolve_population`; None is the eSpeak population)
  must be the one `pick_users` picked `indices` from.
  """
  if not indices:
    raise ValueError('load_users needs at least one speaker index.')
  pop = resolve_population(population)
  if pop is not None:
    return _population_users(corpus, pop, list(indices), clips, cache_dir)
  speakers = {i: _speaker(corpus, i) for i in indices}
  parts = [_annotate(load_user_arrays(corpus, i, clips, cache_dir), i,
                     speakers[i]) for i in indices]
  info = {'accent_groups': sk.ACCENT_NAMES,
          'speakers': [dict(dataclasses.asdict(speakers[i]), index=i,
                            is_outlier_accent=speakers[i].is_outlier_accent)
                       for i in indices],
          'clips': dataclasses.asdict(clips)}
  keywords = _dataset(parts, 'keyword_x', 'keyword_y', tuple(corpus.words),
                      {'accent_group': 'accent_group',
                       'is_outlier_accent': 'is_outlier_accent',
                       'utterance': 'keyword_utt'}, info)
  other = _dataset(parts, 'other_x', 'other_word', OTHER_WORDS,
                   {'utterance': 'other_utt'}, info)
  noise = _dataset(parts, 'noise_x', '', NOISE_CLASSES, {}, info)
  return NewUsers(keywords, other, noise)


def _population_users(corpus: sk.SpeechCorpusConfig, pop: pop_lib.Population,
                      indices: list[int], clips: UserClips,
                      cache_dir: str | None) -> NewUsers:
  """Keyword clips (`population_corpus`) and noise clips of new users."""
  if clips.other_utterances:
    raise ValueError(
        f'UserClips.other_utterances={clips.other_utterances}: other words '
        f'are spoken by the eSpeak population only, not {POPULATION_KEY}='
        f'{pop.name!r}; ask for 0.')
  config = dataclasses.replace(corpus, num_speakers=max(indices) + 1,
                               utterances_per_word=clips.utterances_per_word)
  keywords = population_corpus.load_speakers(config, pop, indices, cache_dir)
  info = dict(keywords.info, clips=dataclasses.asdict(clips))
  empty = np.zeros(0, np.int32)
  parts = [{'other_x': _features([]), 'other_word': empty,
            'other_utt': empty, 'client_id_other_x': empty,
            'noise_x': _noise_features(corpus, i, clips),
            'client_id_noise_x': np.full(clips.num_noise, i, np.int32)}
           for i in indices]
  return NewUsers(dataclasses.replace(keywords, info=info),
                  _dataset(parts, 'other_x', 'other_word', OTHER_WORDS,
                           {'utterance': 'other_utt'}, info),
                  _dataset(parts, 'noise_x', '', NOISE_CLASSES, {}, info))


def feature_stats(train: ArrayDataset) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) per mel band that normalised a `registry` training split."""
  if 'feature_mean' not in train.info or 'feature_std' not in train.info:
    raise ValueError('normalise_like needs a training split from '
                     'ondevice.data.registry.load_dataset (its info holds '
                     "'feature_mean' and 'feature_std').")
  return (np.asarray(train.info['feature_mean'], np.float64),
          np.asarray(train.info['feature_std'], np.float64))


def normalise_like(users: NewUsers, train: ArrayDataset) -> NewUsers:
  """Standardises every set of `users` with `train`'s feature statistics."""
  return NewUsers(*(normalise_dataset(ds, train) for ds in
                    (users.keywords, users.other_words, users.noise)))


def load_word_clips(corpus: sk.SpeechCorpusConfig, indices: list[int],
                    keywords, keyword_utterances: int,
                    other_utterances: int = 0, cache_dir: str | None = None,
                    population=None, num_workers: int | None = None
                    ) -> ArrayDataset:
  """Raw log-mel clips of the users `indices`, every word of the corpus.

  The keywords are spoken `keyword_utterances` times and the corpus's other
  words `other_utterances` times (0: not at all): a device needs many clips
  of each keyword (to calibrate, enroll and evaluate) but fewer of each of
  the many other words (false accepts). A clip depends only on (seed,
  speaker, word, utterance), so these are exactly the clips of a corpus of
  these speakers with more utterances. Every user is cached in its own
  files, synthesised by `num_workers` spawned processes (default: up to 4),
  so a user already built for another set of users is reused and an
  interrupted build keeps the users it finished.

  Returns:
    ArrayDataset with y over corpus.words, client_id the speaker index and
    the meta columns of `load_users`' keyword set ('utterance', ...), users
    in the order of `indices`.
  """
  plan = _word_plan(corpus, keywords, keyword_utterances, other_utterances)
  jobs = [(corpus, words, utterances, int(i), cache_dir, population)
          for i in indices for words, utterances in plan]
  workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
  if workers > 1 and len(jobs) > 1:
    # Spawned, not forked: JAX in this process is threaded.
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      for done, _ in enumerate(pool.imap_unordered(_user_words, jobs), 1):
        if done % max(1, len(jobs) // 20) == 0 or done == len(jobs):
          logging.info('New users: %d/%d (user, word set) files ready.',
                       done, len(jobs))
  return concatenate([_user_words(job) for job in jobs])


def _word_plan(corpus: sk.SpeechCorpusConfig, keywords,
               keyword_utterances: int, other_utterances: int
               ) -> list[tuple[tuple[str, ...], int]]:
  """[(words, utterances)]: the keywords, then the corpus's other words."""
  keywords = tuple(keywords)
  unknown = [w for w in keywords if w not in corpus.words]
  if unknown or not keywords:
    raise ValueError(f'keywords {unknown or keywords} must be words of the '
                     f'corpus {corpus.words}.')
  if keyword_utterances < 1 or other_utterances < 0:
    raise ValueError('keyword_utterances must be >= 1 and other_utterances '
                     f'>= 0; got {keyword_utterances} and {other_utterances}.')
  others = tuple(w for w in corpus.words if w not in keywords)
  plan = [(keywords, keyword_utterances)]
  if other_utterances and others:
    plan.append((others, other_utterances))
  return plan


def _user_words(job) -> ArrayDataset:
  """One user's clips of one word set (cached), labels over corpus.words."""
  corpus, words, utterances, index, cache_dir, population = job
  part = load_users(dataclasses.replace(corpus, words=words), [index],
                    UserClips(utterances_per_word=max(utterances, 2)),
                    cache_dir, population).keywords
  part = part.take(part.meta['utterance'] < utterances)
  return _relabel(part, corpus.words)


def _relabel(ds: ArrayDataset, words: tuple[str, ...]) -> ArrayDataset:
  """`ds` with labels over `words` (a superset of ds.class_names)."""
  to_words = np.array([words.index(w) for w in ds.class_names], np.int32)
  return dataclasses.replace(ds, y=to_words[ds.y], class_names=words)


def concatenate(parts: list[ArrayDataset]) -> ArrayDataset:
  """Rows of datasets of the same classes, in order; meta columns that every
  part has, and the union of their speaker records."""
  if not parts:
    raise ValueError('concatenate needs at least one dataset.')
  names = parts[0].class_names
  if any(p.class_names != names for p in parts):
    raise ValueError('concatenate needs datasets over the same classes.')
  columns = set.intersection(*(set(p.meta) for p in parts))
  speakers = {}
  for part in parts:
    for record in part.info.get('speakers', []):
      speakers.setdefault(record['index'], record)
  cat = lambda field: np.concatenate([getattr(p, field) for p in parts])
  return ArrayDataset(
      x=cat('x'), y=cat('y'), client_id=cat('client_id'), class_names=names,
      meta={c: np.concatenate([p.meta[c] for p in parts])
            for c in sorted(columns)},
      info=dict(parts[0].info, speakers=list(speakers.values())))


def normalise_dataset(ds: ArrayDataset, train: ArrayDataset) -> ArrayDataset:
  """`ds` standardised with `train`'s feature statistics (as
  `normalise_like` does for every set of `NewUsers`)."""
  mean, std = feature_stats(train)
  return dataclasses.replace(ds, x=((ds.x - mean) / std).astype(np.float32))
