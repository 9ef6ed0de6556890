"""CMU Flite as an engine: the `flite` binary of the Debian package `flite`.

Flite (Black and Lenzo, "Flite: a small fast run-time synthesis engine",
ISCA SSW4 2001) ships five English voices built from recordings of real
speakers: diphone voices kal (8 kHz) and kal16, and the clustergen
statistical voices awb (Scottish male), rms (American male) and slt
(American female). Each utterance is one subprocess writing a WAV file; the
duration stretch is Flite's `duration_stretch` feature. Flite has no random
state, so its output depends on its arguments alone.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from typing import Sequence

import numpy as np

from ondevice.data.engines import resample

NAME = 'flite'
DEBIAN_PACKAGE = 'flite'
VOICES = ('kal', 'kal16', 'awb', 'rms', 'slt')
_TIMEOUT_S = 60


def voices() -> tuple[str, ...]:
  return VOICES


def _binary() -> str | None:
  return shutil.which('flite')


def missing_package(voice: str) -> str | None:
  del voice  # The binary links all five voices.
  return None if _binary() else DEBIAN_PACKAGE


@functools.lru_cache(maxsize=None)
def version() -> str:
  """`flite --version`'s version line, e.g. 'flite-2.2-current Sep 2018'."""
  out = subprocess.run([_binary() or 'flite', '--version'], check=False,
                       capture_output=True, text=True,
                       timeout=_TIMEOUT_S).stdout
  lines = [l.strip() for l in out.splitlines() if 'version' in l]
  return lines[0] if lines else out.strip()


def speak_many(texts: Sequence[str], voice: str, stretches: Sequence[float],
               noise_seeds: Sequence[int]) -> list[np.ndarray]:
  """One `flite` run per text; int16 at 16 kHz (kal is upsampled from 8)."""
  del noise_seeds  # Flite is deterministic.
  if voice not in VOICES:
    raise ValueError(f'Flite has no voice {voice!r}; choose one of {VOICES}.')
  out = []
  with tempfile.TemporaryDirectory(prefix='flite_') as folder:
    path = os.path.join(folder, 'out.wav')
    for text, stretch in zip(texts, stretches, strict=True):
      subprocess.run(
          [_binary() or 'flite', '-voice', voice, '--setf',
           f'duration_stretch={float(stretch):.6f}', '-t', text, '-o', path],
          check=True, capture_output=True, timeout=_TIMEOUT_S)
      with open(path, 'rb') as f:
        samples, rate = resample.read_wav(f.read())
      out.append(resample.to_16k(samples, rate))
  return out
