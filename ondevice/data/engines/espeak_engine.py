"""eSpeak NG as an engine: the ctypes wrapper of `ondevice.data.espeak`.

Voices are eSpeak language voices, optionally with a variant ('en-us',
'de+f2'); a voice of another language reads the English words with its own
letter-to-sound rules, which gives an accent. The duration stretch maps to
the speaking rate (175 words per minute / stretch). The library carries
hidden state between calls, so each `speak_many` call starts from a freshly
reset engine: its output is then a function of its arguments alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ondevice.data import espeak
from ondevice.data.engines import resample

NAME = 'espeak'
DEBIAN_PACKAGE = 'espeak-ng'
BASE_RATE = 175           # words per minute at stretch 1
# Language voices the populations use (any eSpeak voice name works).
LANGUAGES = ('en-us', 'en-us-nyc', 'en', 'en-gb-x-rp', 'en-gb-scotland',
             'en-029', 'de', 'fr', 'es', 'it', 'fi', 'hu', 'tr', 'cy', 'sw',
             'pl', 'nl', 'hi', 'vi', 'zh')
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4',
            'f5', 'klatt', 'klatt2', 'klatt3', 'klatt4', 'croak', 'whisper')


def voices() -> tuple[str, ...]:
  """Every language of LANGUAGES, alone or with a variant ('de+f2')."""
  return LANGUAGES + tuple(f'{lang}+{v}' for lang in LANGUAGES
                           for v in VARIANTS)


def missing_package(voice: str) -> str | None:
  del voice  # Every voice ships with espeak-ng-data.
  return None if espeak.is_available() else DEBIAN_PACKAGE


def version() -> str:
  return f'espeak-ng {espeak.version()}'


def speak_many(texts: Sequence[str], voice: str, stretches: Sequence[float],
               noise_seeds: Sequence[int]) -> list[np.ndarray]:
  """Speaks each text in order after one reset; int16 at 16 kHz."""
  espeak.reset()
  out = []
  for text, stretch, seed in zip(texts, stretches, noise_seeds, strict=True):
    rate = np.clip(BASE_RATE / stretch, *espeak.RATE_RANGE)
    raw = espeak.synthesize(text, voice=voice, rate=rate,
                            noise_seed=int(seed))
    out.append(resample.to_16k(raw, espeak.sample_rate()))
  return out
