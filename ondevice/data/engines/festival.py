"""The Festival speech synthesis system as an engine (Debian `festival`).

Festival (Taylor, Black and Caley, "The architecture of the Festival speech
synthesis system", ESCA SSW3 1998) runs with the festvox voices that Debian
packages: two American English diphone voices, an American English HTS
voice, and voices of other languages (Catalan, Czech, Finnish, Italian) that
read the English words with their own lexicon and letter-to-sound rules,
which gives real foreign accents. (Debian's Hindi, Marathi and Telugu voices
crash on Latin text, so they are not offered.)

One `festival --batch` process speaks all texts of a call, each into its own
WAV file, which amortises Festival's start-up over a speaker's clips. The
duration stretch is `Duration_Stretch` for diphone voices and the HTS
engine's speed `-r` (= 1 / stretch) for HTS voices. Festival has no random
state, so every utterance depends on its own arguments alone.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from typing import NamedTuple, Sequence

from absl import logging
import numpy as np

from ondevice.data.engines import resample

NAME = 'festival'
DEBIAN_PACKAGE = 'festival'
_VOICE_ROOT = '/usr/share/festival/voices'
_TIMEOUT_S = 600
_RETRIES = 4           # Nudged retries of a text that crashes the voice.
_RETRY_STRETCH = 1.03  # Duration factor per retry.


class Voice(NamedTuple):
  language_dir: str   # folder under /usr/share/festival/voices
  package: str        # Debian package that ships it
  hts: bool           # HTS voices take their speed from hts_engine_params


VOICES = {
    'kal_diphone': Voice('english', 'festvox-kallpc16k', False),
    'ked_diphone': Voice('english', 'festvox-kdlpc16k', False),
    'cmu_us_slt_arctic_hts': Voice('us', 'festvox-us-slt-hts', True),
    'upc_ca_ona_hts': Voice('catalan', 'festvox-ca-ona-hts', True),
    'czech_krb': Voice('czech', 'festvox-czech-krb', False),
    'czech_ph': Voice('czech', 'festvox-czech-ph', False),
    'hy_fi_mv_diphone': Voice('finnish', 'festvox-suopuhe-mv', False),
    'suo_fi_lj_diphone': Voice('finnish', 'festvox-suopuhe-lj', False),
    'lp_diphone': Voice('italian', 'festvox-italp16k', False),
    'pc_diphone': Voice('italian', 'festvox-itapc16k', False),
}


def voices() -> tuple[str, ...]:
  return tuple(VOICES)


def missing_package(voice: str) -> str | None:
  """'festival' without the binary, the voice's package without the voice."""
  if not shutil.which('festival'):
    return DEBIAN_PACKAGE
  spec = VOICES[voice]
  if not os.path.isdir(os.path.join(_VOICE_ROOT, spec.language_dir, voice)):
    return spec.package
  return None


@functools.lru_cache(maxsize=None)
def version() -> str:
  """Festival's version and the Debian versions of the installed voices."""
  festival = subprocess.run(['festival', '--version'], check=True,
                            capture_output=True, text=True,
                            timeout=60).stdout.strip()
  packages = sorted({v.package for v in VOICES.values()})
  try:
    query = subprocess.run(
        ['dpkg-query', '-W', '-f', '${Package} ${Version}\n'] + packages,
        capture_output=True, text=True, timeout=60, check=False).stdout
  except FileNotFoundError:  # Not Debian: the voices' versions are unknown.
    query = ''
  return '; '.join([festival] + sorted(query.split('\n'))[1:])


def _quote(text: str) -> str:
  return '"' + text.replace('\\', '\\\\').replace('"', '\\"') + '"'


def _script(texts, voice: str, stretches, folder: str) -> str:
  """The Scheme program that writes text i to folder/i.wav."""
  spec = VOICES[voice]
  lines = [f'(voice_{voice})']
  if spec.hts:
    lines.append('(set! base_hts_params hts_engine_params)')
  for i, (text, stretch) in enumerate(zip(texts, stretches, strict=True)):
    if spec.hts:
      lines.append('(set! hts_engine_params (append base_hts_params '
                   f'(list (list "-r" {1.0 / float(stretch):.6f}))))')
    else:
      lines.append(f"(Parameter.set 'Duration_Stretch {float(stretch):.6f})")
    path = os.path.join(folder, f'{i}.wav')
    lines.append(f'(utt.save.wave (utt.synth (Utterance Text {_quote(text)}))'
                 f' {_quote(path)} \'riff)')
  return '\n'.join(lines) + '\n'


def speak_many(texts: Sequence[str], voice: str, stretches: Sequence[float],
               noise_seeds: Sequence[int]) -> list[np.ndarray]:
  """All texts in as few Festival processes as possible; int16 at 16 kHz.

  Some voices crash (a segfault) on a few (word, duration) pairs. The clips
  written before a crash are kept, the failing text is spoken alone with
  its duration stretched by `_RETRY_STRETCH` per retry (a deterministic
  change, logged), and the rest continue in a new process; a text that
  fails `_RETRIES` times raises.
  """
  del noise_seeds  # Festival is deterministic.
  if voice not in VOICES:
    raise ValueError(f'Festival has no voice {voice!r}; choose one of '
                     f'{tuple(VOICES)}.')
  texts, stretches = list(texts), [float(s) for s in stretches]
  if len(texts) != len(stretches):
    raise ValueError(f'{len(texts)} texts but {len(stretches)} stretches.')
  out: list[np.ndarray] = []
  while len(out) < len(texts):
    spoken, _ = _run(texts[len(out):], voice, stretches[len(out):])
    out += spoken
    if len(out) < len(texts):
      out.append(_speak_with_retries(texts[len(out)], voice,
                                     stretches[len(out)]))
  return out


def _run(texts: Sequence[str], voice: str, stretches: Sequence[float]
         ) -> tuple[list[np.ndarray], str]:
  """One Festival process: (the clips written before any failure, why it
  stopped: '' when every text was spoken)."""
  with tempfile.TemporaryDirectory(prefix='festival_') as folder:
    script = os.path.join(folder, 'speak.scm')
    with open(script, 'w', encoding='utf-8') as f:
      f.write(_script(texts, voice, stretches, folder))
    run = subprocess.run(['festival', '--batch', script], capture_output=True,
                         text=True, timeout=_TIMEOUT_S, check=False)
    out = []
    for i in range(len(texts)):
      path = os.path.join(folder, f'{i}.wav')
      if not os.path.exists(path):
        break
      with open(path, 'rb') as f:
        samples, rate = resample.read_wav(f.read())
      out.append(resample.to_16k(samples, rate))
  why = '' if len(out) == len(texts) else (
      f'exit {run.returncode}: {run.stderr[-300:]}')
  return out, why


def _speak_with_retries(text: str, voice: str, stretch: float) -> np.ndarray:
  """`text` alone, its stretch nudged by `_RETRY_STRETCH` per retry."""
  why = ''
  for attempt in range(1, _RETRIES + 1):
    nudged = stretch * _RETRY_STRETCH ** attempt
    spoken, why = _run([text], voice, [nudged])
    if spoken:
      logging.warning('Festival voice %r crashed on %r at stretch %.4f; '
                      'spoke it at %.4f.', voice, text, stretch, nudged)
      return spoken[0]
  raise RuntimeError(f'Festival voice {voice!r} failed on {text!r} at '
                     f'stretch {stretch:.4f} and {_RETRIES} nudged stretches '
                     f'({why}).')
