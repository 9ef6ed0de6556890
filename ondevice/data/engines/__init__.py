"""Voice engines behind one interface: each engine is a speaker family.

Every engine module offers the same functions, so that a population can mix
them by name:

    NAME, DEBIAN_PACKAGE      how the config names it, what apt installs
    voices()                  the voice names it knows
    missing_package(voice)    the Debian package to install, or None
    version()                 a string that changes when its output may
    speak_many(texts, voice, stretches, noise_seeds)
                              -> [int16 mono samples at 16 kHz, ...]

`stretches` scale each utterance's duration (2.0 = twice as slow) with the
engine's own duration model, so the pitch is untouched; `noise_seeds` seed
an engine's random noise where it has any. Every engine is deterministic: the
same call gives the same samples. Flite and Festival speak each text
independently of the others; eSpeak NG carries hidden state from one text to
the next within a call (each call starts from a reset engine), so callers
that need a clip to be independent of the other texts keep their order
fixed.

    from ondevice.data import engines
    flite = engines.get_engine('flite', 'config.data.population')
    (clip,) = flite.speak_many(['house'], 'slt', [1.0], [0])
"""
from __future__ import annotations

import types

from ondevice.data.engines import espeak_engine
from ondevice.data.engines import festival
from ondevice.data.engines import flite

ENGINES = {m.NAME: m for m in (espeak_engine, flite, festival)}


def get_engine(name: str, key: str) -> types.ModuleType:
  """The engine module called `name`; `key` is the config key to blame.

  Raises:
    ValueError: unknown engine name.
  """
  if name not in ENGINES:
    raise ValueError(f'{key}: engine {name!r} is unknown; choose one of '
                     f'{sorted(ENGINES)}.')
  return ENGINES[name]


def check_voice(engine_name: str, voice: str, key: str) -> None:
  """Raises ValueError (naming `key`) if the voice is unknown or missing.

  A known voice whose Debian package is not installed names the package and
  the apt-get command that installs it.
  """
  engine = get_engine(engine_name, key)
  if voice not in engine.voices():
    raise ValueError(f'{key}: {engine_name} has no voice {voice!r}; choose '
                     f'one of {sorted(engine.voices())}.')
  package = engine.missing_package(voice)
  if package:
    raise ValueError(
        f'{key}: {engine_name} voice {voice!r} needs the Debian package '
        f'{package!r}, which is not installed: run `sudo apt-get install '
        f'{package}` (or `make setup`).')


def speak(engine_name: str, text: str, voice: str, stretch: float = 1.0,
          noise_seed: int = 0):
  """One utterance: int16 samples at 16 kHz."""
  engine = ENGINES[engine_name]
  return engine.speak_many([text], voice, [stretch], [noise_seed])[0]
