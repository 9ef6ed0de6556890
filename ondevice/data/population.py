"""Speaker populations from several voice engines, rooms and microphones.

A population is a table of speaker families (a voice engine and its voices:
eSpeak NG's English and foreign voices, Flite's voices recorded from real
speakers, Festival's English and foreign voices; see `ondevice.data.engines`)
and tables of recording conditions: a timbre (f0, vocal-tract length and
speaking rate: adults, children, elders; see `ondevice.data.timbre`), a room
(an impulse response from its size, RT60 and source-to-microphone distance),
a device microphone (band and spectral tilt) and background noise (kind and
SNR range); see `ondevice.data.rooms`. Every entry has a weight; a speaker
draws one entry of every table, and then its voice and its parameters
within the entry's ranges, all from its seed.

Families and conditions can be held out of pre-training. Outlier users are
defined before any measurement (see also `ondevice.data.outliers`):

  (a) unseen: a speaker whose family, or any of whose conditions, is held
      out (`PopulationSpeaker.unseen`); no such speaker is in the
      pre-training corpus, which holds the seen speakers among indices
      0..num_speakers-1;
  (b) worst: the `worst_fraction` (20%) of new seen users on whom the
      global model detects the fewest keywords among their own calibration
      clips, scored on other, disjoint evaluation clips
      (`outliers.select_worst_users`).

The eSpeak-only corpus of `speech_keywords` is the population 'espeak', the
default: `load_corpus(config, population=None)` returns it unchanged.

    pop = population_from_config('mixed_unseen', 'config.data.population')
    ds = population_corpus.load_population_keywords(
        SpeechCorpusConfig(num_speakers=200), pop)

New users of a population (typical and unseen) come from
`ondevice.user_corpus.pick_users` and `load_users` with `population=`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ondevice.data import engines
from ondevice.data import rooms

MARGIN_M = 0.3             # source and microphone stay this far from walls
LEGACY = 'espeak'          # the eSpeak-only corpus of speech_keywords


class Family(NamedTuple):
  """A speaker family: one engine and the voices its speakers draw from."""
  name: str
  engine: str
  voices: tuple[str, ...]
  weight: float


class Timbre(NamedTuple):
  """Voice ranges: f0 shift (semitones), formant scale, duration stretch."""
  name: str
  f0_semitones: tuple[float, float]
  vtl_factor: tuple[float, float]
  stretch: tuple[float, float]
  weight: float


class RoomCondition(NamedTuple):
  """Rooms: size ranges (m), RT60 (s), source-to-microphone distance (m).

  `mic` fixes the microphone's position (e.g. a device on a desk); None
  draws it at random inside the room.
  """
  name: str
  size_low: tuple[float, float, float]
  size_high: tuple[float, float, float]
  rt60: tuple[float, float]
  distance: tuple[float, float]
  weight: float
  mic: tuple[float, float, float] | None = None


class MicCondition(NamedTuple):
  """Device microphones: band edges (Hz) and tilt (dB/octave) ranges."""
  name: str
  low_hz: tuple[float, float]
  high_hz: tuple[float, float]
  tilt_db_per_octave: tuple[float, float]
  weight: float


class NoiseCondition(NamedTuple):
  """Background noise: kinds drawn per speaker, SNR range per utterance."""
  name: str
  kinds: tuple[str, ...]
  snr_db: tuple[float, float]
  weight: float


@dataclasses.dataclass(frozen=True)
class Population:
  """Every table of a population; every field enters the cache key."""
  name: str
  families: tuple[Family, ...]
  timbres: tuple[Timbre, ...]
  rooms: tuple[RoomCondition, ...]
  mics: tuple[MicCondition, ...]
  noises: tuple[NoiseCondition, ...]
  held_out_families: tuple[str, ...] = ()
  held_out_conditions: tuple[str, ...] = ()
  worst_fraction: float = 0.2
  f0_jitter_semitones: float = 0.3

  def condition_tables(self) -> dict[str, tuple]:
    return {'timbres': self.timbres, 'rooms': self.rooms, 'mics': self.mics,
            'noises': self.noises}


_ESPEAK_ENGLISH = ('en-us', 'en-us-nyc', 'en', 'en-gb-x-rp',
                   'en-gb-scotland', 'en-029')
_ESPEAK_FOREIGN = ('de', 'fr', 'es', 'it', 'fi', 'hu', 'tr', 'cy', 'sw', 'pl',
                   'nl')
FAMILIES = (
    Family('espeak_english', 'espeak', _ESPEAK_ENGLISH, 0.25),
    Family('espeak_foreign', 'espeak', _ESPEAK_FOREIGN, 0.15),
    Family('flite', 'flite', ('kal', 'kal16', 'awb', 'rms', 'slt'), 0.25),
    Family('festival_english', 'festival',
           ('kal_diphone', 'ked_diphone', 'cmu_us_slt_arctic_hts'), 0.20),
    Family('festival_foreign', 'festival',
           ('upc_ca_ona_hts', 'czech_krb', 'czech_ph', 'hy_fi_mv_diphone',
            'suo_fi_lj_diphone', 'lp_diphone', 'pc_diphone'), 0.15),
)
TIMBRES = (
    Timbre('adult', (-2.0, 2.0), (0.92, 1.08), (0.9, 1.15), 0.73),
    Timbre('child', (4.0, 9.0), (1.2, 1.4), (1.0, 1.3), 0.12),
    Timbre('elderly', (-3.0, 0.0), (0.88, 0.97), (1.15, 1.45), 0.15),
)
ROOMS = (
    RoomCondition('close_talk', (3.0, 3.0, 2.4), (4.5, 4.0, 2.7),
                  (0.15, 0.3), (0.3, 0.8), 0.4),
    RoomCondition('living_room', (4.0, 3.5, 2.5), (7.0, 6.0, 3.0),
                  (0.3, 0.6), (1.0, 2.5), 0.4),
    RoomCondition('hall', (10.0, 8.0, 3.5), (16.0, 12.0, 5.0),
                  (0.6, 1.0), (2.0, 4.0), 0.2),
)
MICS = (
    MicCondition('studio', (50.0, 100.0), (8000.0, 8000.0), (-1.0, 1.0), 0.3),
    MicCondition('laptop', (150.0, 300.0), (6000.0, 7000.0), (1.0, 3.0), 0.3),
    MicCondition('phone', (200.0, 400.0), (3400.0, 4000.0), (-2.0, 0.0),
                 0.25),
    MicCondition('wearable', (300.0, 500.0), (4000.0, 5500.0), (-3.0, -1.0),
                 0.15),
)
NOISES = (
    NoiseCondition('quiet', ('white', 'pink'), (25.0, 35.0), 0.35),
    NoiseCondition('home', ('pink', 'brown', 'hum'), (12.0, 25.0), 0.45),
    NoiseCondition('street', ('brown', 'babble'), (5.0, 15.0), 0.2),
)
MIXED = Population('mixed', FAMILIES, TIMBRES, ROOMS, MICS, NOISES)
# Foreign Festival voices, children and halls never reach pre-training.
MIXED_UNSEEN = dataclasses.replace(
    MIXED, name='mixed_unseen', held_out_families=('festival_foreign',),
    held_out_conditions=('child', 'hall'))
POPULATIONS = {p.name: p for p in (MIXED, MIXED_UNSEEN)}
NAMES = (LEGACY,) + tuple(POPULATIONS)

_TABLE_TYPES = {'families': Family, 'timbres': Timbre, 'rooms': RoomCondition,
                'mics': MicCondition, 'noises': NoiseCondition}
_OVERRIDES = ('base', 'family_weights', 'held_out_families',
              'held_out_conditions', 'worst_fraction') + tuple(_TABLE_TYPES)


def population_from_config(value: Any, key: str) -> Population | None:
  """The population that `config.data.population` names; None = eSpeak only.

  Args:
    value: None, '' or 'espeak' (the eSpeak-only corpus); a name in
      POPULATIONS; or a mapping with 'base' (a name, default 'mixed') and
      overrides: 'family_weights' {family: weight}, 'held_out_families',
      'held_out_conditions', 'worst_fraction', and per table ('families',
      'timbres', 'rooms', 'mics', 'noises') {entry name: {field: value}},
      which edits an entry or, given every field, adds one.
    key: the config key to name in errors.

  Raises:
    ValueError: unknown names or fields, or an invalid population (see
      `validate_population`), before anything is synthesised.
  """
  if value is None or value == '' or value == LEGACY:
    return None
  if not isinstance(value, str) and not hasattr(value, 'keys'):
    raise ValueError(f'{key}={value!r} must be a name, one of {NAMES}, or a '
                     'mapping of overrides.')
  if isinstance(value, str):
    if value not in POPULATIONS:
      raise ValueError(f'{key}={value!r} is unknown; choose one of {NAMES}.')
    pop = POPULATIONS[value]
  else:
    pop = _apply_overrides(dict(value), key)
  validate_population(pop, key)
  return pop


def _apply_overrides(overrides: dict, key: str) -> Population:
  unknown = sorted(set(overrides) - set(_OVERRIDES))
  if unknown:
    raise ValueError(f'{key} has unknown fields {unknown}; valid fields are '
                     f'{_OVERRIDES}.')
  base = overrides.pop('base', MIXED.name)
  if base not in POPULATIONS:
    raise ValueError(f'{key}.base={base!r} is unknown; choose one of '
                     f'{tuple(POPULATIONS)}.')
  pop = POPULATIONS[base]
  changes = {}
  for table in _TABLE_TYPES:
    if table in overrides:
      changes[table] = _edit_table(getattr(pop, table), table,
                                   dict(overrides.pop(table)), f'{key}.{table}')
  weights = dict(overrides.pop('family_weights', None) or {})
  families = changes.get('families', pop.families)
  for name in weights:
    if name not in [f.name for f in families]:
      raise ValueError(f'{key}.family_weights names family {name!r}, which '
                       f'is unknown; choose among {[f.name for f in families]}.')
  changes['families'] = tuple(f._replace(weight=float(weights.get(f.name,
                                                                  f.weight)))
                              for f in families)
  for name in ('held_out_families', 'held_out_conditions'):
    if name in overrides:
      changes[name] = tuple(overrides.pop(name) or ())
  if 'worst_fraction' in overrides:
    changes['worst_fraction'] = float(overrides.pop('worst_fraction'))
  return dataclasses.replace(pop, name=f'{base}+custom', **changes)


def _edit_table(entries: tuple, table: str, edits: dict, key: str) -> tuple:
  """Replaces fields of named entries; a new name needs every field."""
  kind = _TABLE_TYPES[table]
  out = {e.name: e for e in entries}
  for name, fields in edits.items():
    fields = {k: _tuple(v) for k, v in dict(fields).items()}
    bad = sorted(set(fields) - set(kind._fields) - {'name'})
    if bad:
      raise ValueError(f'{key}[{name!r}] has unknown fields {bad}; valid '
                       f'fields are {kind._fields[1:]}.')
    if name in out:
      out[name] = out[name]._replace(**fields)
    else:
      try:
        out[name] = kind(name=name, **fields)
      except TypeError as e:
        raise ValueError(f'{key}[{name!r}] is a new entry and needs the '
                         f'fields {kind._fields[1:]} ({e}).') from e
  return tuple(out.values())


def _tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def validate_population(pop: Population, key: str) -> None:
  """Raises ValueError naming `key` for any population that cannot be built.

  Checks that engines, voices and their Debian packages exist, that held-out
  names exist and leave pre-training speakers, and that every room, mic,
  noise and timbre range is physically possible.
  """
  if not pop.families:
    raise ValueError(f'{key}.families is empty.')
  for table, entries in [('families', pop.families),
                         *pop.condition_tables().items()]:
    _check_weights(entries, f'{key}.{table}')
  for family in pop.families:
    if not family.voices:
      raise ValueError(f'{key}.families[{family.name!r}] has no voices.')
    for voice in family.voices:
      engines.check_voice(family.engine, voice,
                          f'{key}.families[{family.name!r}]')
  _check_held_out(pop, key)
  for room in pop.rooms:
    _check_room_condition(room, f'{key}.rooms[{room.name!r}]')
  for mic in pop.mics:
    for low, high in zip(mic.low_hz, mic.high_hz):
      rooms.check_mic(rooms.Mic(low, high, 0.0), f'{key}.mics[{mic.name!r}]')
  for noise in pop.noises:
    bad = [k for k in noise.kinds if k not in rooms.NOISE_KINDS]
    if bad or not noise.kinds or noise.snr_db[0] > noise.snr_db[1]:
      raise ValueError(f'{key}.noises[{noise.name!r}]: kinds must be among '
                       f'{rooms.NOISE_KINDS} and snr_db a (low, high) range; '
                       f'got {noise.kinds}, {noise.snr_db}.')
  for t in pop.timbres:
    if min(t.vtl_factor) <= 0 or min(t.stretch) <= 0:
      raise ValueError(f'{key}.timbres[{t.name!r}]: vtl_factor and stretch '
                       f'must be positive; got {t.vtl_factor}, {t.stretch}.')
  if not 0.0 < pop.worst_fraction < 1.0:
    raise ValueError(f'{key}.worst_fraction must lie in (0, 1); got '
                     f'{pop.worst_fraction}.')


def _check_weights(entries, key: str) -> None:
  names = [e.name for e in entries]
  if not entries or len(set(names)) != len(names):
    raise ValueError(f'{key} needs distinct, named entries; got {names}.')
  if any(not e.weight > 0 for e in entries):
    raise ValueError(f'{key}: every weight must be > 0; got '
                     f'{[(e.name, e.weight) for e in entries]}.')


def _check_held_out(pop: Population, key: str) -> None:
  """Held-out names must exist and leave speakers for pre-training."""
  families = [f.name for f in pop.families]
  unknown = [n for n in pop.held_out_families if n not in families]
  if unknown:
    raise ValueError(f'{key}.held_out_families: unknown families {unknown}; '
                     f'choose among {families}.')
  if set(families) <= set(pop.held_out_families):
    raise ValueError(f'{key}.held_out_families={pop.held_out_families} holds '
                     'out every family, which leaves no pre-training '
                     'speakers; keep at least one family seen.')
  conditions = {e.name: table for table, entries in
                pop.condition_tables().items() for e in entries}
  unknown = [n for n in pop.held_out_conditions if n not in conditions]
  if unknown:
    raise ValueError(f'{key}.held_out_conditions: unknown conditions '
                     f'{unknown}; choose among {sorted(conditions)}.')
  for table, entries in pop.condition_tables().items():
    if {e.name for e in entries} <= set(pop.held_out_conditions):
      raise ValueError(f'{key}.held_out_conditions holds out every entry of '
                       f'{table}, which leaves no pre-training speakers.')


def _check_room_condition(room: RoomCondition, key: str) -> None:
  """RT60 > 0, reachable in the largest room, and a microphone inside."""
  if not 0 < room.rt60[0] <= room.rt60[1]:
    raise ValueError(f'{key}.rt60 must be a range of positive seconds '
                     f'(RT60 > 0); got {room.rt60}.')
  if not 0 < room.distance[0] <= room.distance[1]:
    raise ValueError(f'{key}.distance must be a positive range; got '
                     f'{room.distance}.')
  low, high = np.asarray(room.size_low), np.asarray(room.size_high)
  if low.shape != (3,) or high.shape != (3,) or np.any(low <= 2 * MARGIN_M
                                                       ) or np.any(low > high):
    raise ValueError(f'{key}: size_low and size_high must be 3 lengths above '
                     f'{2 * MARGIN_M} m with low <= high; got '
                     f'{room.size_low}, {room.size_high}.')
  if rooms.sabine_absorption(room.rt60[0], room.size_high) >= 1.0:
    raise ValueError(f'{key}.rt60: {room.rt60[0]} s is too short for a room '
                     f'of size {room.size_high}; raise it or shrink the room.')
  if room.mic is not None:
    mic = np.asarray(room.mic, np.float64)
    if mic.shape != (3,) or np.any(mic <= 0) or np.any(mic >= low):
      raise ValueError(f'{key}.mic={room.mic} lies outside the smallest room '
                       f'{room.size_low}; put the microphone inside it.')
  reach = np.linalg.norm(low[:2] - 2 * MARGIN_M)
  if room.distance[1] > reach:
    raise ValueError(f'{key}.distance {room.distance} does not fit in the '
                     f'smallest room {room.size_low} (at most {reach:.2f} m).')
