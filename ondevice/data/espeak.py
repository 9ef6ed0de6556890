"""A small ctypes binding to the eSpeak NG speech synthesiser.

eSpeak NG is a formant synthesiser (Klatt-style, see D. H. Klatt, "Software
for a cascade/parallel formant synthesizer", JASA 1980) shipped as the Debian
package `espeak-ng`. We call its C API (`speak_lib.h`) directly so that words
are synthesised in memory, without a subprocess or a WAV file per word.

The library keeps global state (one current voice, one set of parameters, one
callback), so this module owns a single engine, initialised on first use and
guarded by a lock. Every call of `synthesize` sets the voice and all the
parameters it uses. The synthesiser also carries hidden state from one call
to the next (the phase of its pitch "flutter", automatic gain control, noise
filters, and C's rand() for breathy voices), so the same call can give
slightly different samples later in a process. `reset()` unloads and reloads
the library to start from a fresh state, and `synthesize(noise_seed=...)`
seeds rand(): a sequence of calls made after `reset()` is reproducible bit
for bit.

    reset()
    samples = synthesize('house', voice='de+f2', rate=160, pitch=60)
    samples.dtype, sample_rate()   # int16, 22050
"""
from __future__ import annotations

import _ctypes
import ctypes
import ctypes.util
import os
import threading
import warnings

import numpy as np

# Values of the enums in espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EE_OK = 0

# Milliseconds of audio per callback: long enough that a word comes back in
# one or two chunks.
_BUFFER_MS = 500
_FALLBACK_LIBRARY = '/usr/lib/x86_64-linux-gnu/libespeak-ng.so.1'

# Parameter ranges documented in speak_lib.h.
RATE_RANGE = (80, 450)     # words per minute
PITCH_RANGE = (0, 100)     # base pitch
RANGE_RANGE = (0, 100)     # pitch range (0 = monotone)

_INSTALL_HINT = ('Install the speech engine with `sudo apt-get install '
                 'espeak-ng` (or run `make demo`, which installs it).')

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
    ctypes.c_void_p)


class EspeakUnavailableError(RuntimeError):
  """Raised when libespeak-ng cannot be found or initialised."""


def _library_path() -> str:
  """Finds libespeak-ng: $ESPEAK_NG_LIBRARY, ld's search, or Debian's path."""
  explicit = os.environ.get('ESPEAK_NG_LIBRARY')
  if explicit:
    return explicit
  return ctypes.util.find_library('espeak-ng') or _FALLBACK_LIBRARY


def _is_mapped(name: str) -> bool:
  """Whether a file whose path contains `name` is mapped in this process."""
  try:
    with open('/proc/self/maps', encoding='utf-8') as maps:
      return name in maps.read()
  except OSError:
    return False  # No procfs: assume the unload worked.


class _Engine:
  """The process's one eSpeak NG instance (not thread-safe by itself)."""

  def __init__(self):
    path = _library_path()
    try:
      lib = ctypes.CDLL(path)
    except OSError as e:
      raise EspeakUnavailableError(
          f'Could not load libespeak-ng from {path!r} ({e}). '
          f'{_INSTALL_HINT}') from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int,
                                      ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),
        ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, None,
                                 _INITIALIZE_DONT_EXIT)
    if rate <= 0:
      raise EspeakUnavailableError(
          f'espeak_Initialize failed (returned {rate}); the voice data in '
          f'espeak-ng-data may be missing. {_INSTALL_HINT}')
    self.lib = lib
    self.path = path
    self.sample_rate = rate
    self.version = lib.espeak_Info(None).decode('utf-8', 'replace')
    self._chunks: list[bytes] = []
    # The callback object must outlive the library's pointer to it.
    self._callback = _SynthCallback(self._collect)
    lib.espeak_SetSynthCallback(self._callback)
    self._voice: str | None = None

  def close(self) -> bool:
    """Terminates and unloads the library; True if it left the process."""
    self.lib.espeak_Terminate()
    _ctypes.dlclose(self.lib._handle)  # pylint: disable=protected-access
    self.lib = None
    return not _is_mapped('libespeak-ng')

  def _collect(self, wav, num_samples, events) -> int:
    del events  # Word/phoneme timing events are not used.
    if wav and num_samples > 0:
      self._chunks.append(ctypes.string_at(wav, 2 * num_samples))
    return 0  # 0 = continue synthesis.

  def set_voice(self, voice: str) -> None:
    if voice == self._voice:
      return
    status = self.lib.espeak_SetVoiceByName(voice.encode('utf-8'))
    if status != _EE_OK:
      self._voice = None
      raise ValueError(
          f'eSpeak NG has no voice {voice!r} (error {status}). Use a language '
          "code from espeak-ng-data/lang, optionally with a variant from "
          "espeak-ng-data/voices/!v, e.g. 'en-us', 'de+f2', 'en+whisper'.")
    self._voice = voice

  def set_parameter(self, parameter: int, value: int) -> None:
    status = self.lib.espeak_SetParameter(parameter, value, 0)
    if status != _EE_OK:
      raise RuntimeError(f'espeak_SetParameter({parameter}, {value}) failed '
                         f'with error {status}.')

  def synth(self, text: str) -> np.ndarray:
    data = text.encode('utf-8') + b'\0'
    buf = ctypes.create_string_buffer(data, len(data))
    self._chunks = []
    status = self.lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0,
                                   _CHARS_UTF8, None, None)
    if status != _EE_OK:
      raise RuntimeError(f'espeak_Synth failed on {text!r} with error '
                         f'{status}.')
    samples = np.frombuffer(b''.join(self._chunks), dtype='<i2').copy()
    self._chunks = []
    return samples


_LOCK = threading.Lock()
_ENGINE: _Engine | None = None
_LIBC = ctypes.CDLL(ctypes.util.find_library('c'))


def _engine() -> _Engine:
  """Returns the engine, initialising it once; call with _LOCK held."""
  global _ENGINE
  if _ENGINE is None:
    _ENGINE = _Engine()
  return _ENGINE


def is_available() -> bool:
  """True when libespeak-ng loads and initialises."""
  try:
    with _LOCK:
      _engine()
  except EspeakUnavailableError:
    return False
  return True


def reset() -> None:
  """Reloads the library so that the next call starts from a fresh state.

  Costs about 10 ms (reload plus the next call's voice load). If another
  module holds its own handle to libespeak-ng, the library cannot be
  unloaded and a warning says that outputs may depend on earlier calls.
  """
  global _ENGINE
  with _LOCK:
    if _ENGINE is not None:
      unloaded = _ENGINE.close()
      _ENGINE = None
      if not unloaded:
        warnings.warn('libespeak-ng stayed loaded after espeak.reset() '
                      '(another handle holds it); its hidden state was not '
                      'reset, so synthesis may not be reproducible.')


def version() -> str:
  """eSpeak NG's version string, e.g. '1.51'."""
  with _LOCK:
    return _engine().version


def sample_rate() -> int:
  """Sample rate (Hz) of `synthesize`'s output; 22050 for eSpeak NG."""
  with _LOCK:
    return _engine().sample_rate


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> int:
  value = int(round(value))
  if not bounds[0] <= value <= bounds[1]:
    raise ValueError(f'{name}={value} lies outside eSpeak NG\'s range '
                     f'[{bounds[0]}, {bounds[1]}].')
  return value


def synthesize(text: str, *, voice: str = 'en-us', rate: float = 175,
               pitch: float = 50, pitch_range: float = 50,
               noise_seed: int | None = None) -> np.ndarray:
  """Speaks `text` and returns its int16 samples at `sample_rate()`.

  Args:
    text: UTF-8 text, e.g. one keyword.
    voice: eSpeak NG voice name: a language code ('en-us', 'en-gb-scotland',
      'de') with an optional '+variant' ('en-us+m3', 'fr+f2', 'en+whisper').
    rate: speaking rate in words per minute, within `RATE_RANGE`.
    pitch: base pitch, within `PITCH_RANGE` (50 is the voice's default).
    pitch_range: intonation range, within `RANGE_RANGE` (0 is monotone).
    noise_seed: if given, seeds C's rand(), which drives the breath noise of
      whispering and Klatt voices, right before synthesis.

  Returns:
    int16 array of mono samples, including eSpeak's short leading and
    trailing silences.

  Raises:
    EspeakUnavailableError: libespeak-ng is not installed.
    ValueError: unknown voice or a parameter out of range.
  """
  if not text.strip():
    raise ValueError('synthesize needs non-empty text.')
  rate = _check_range('rate', rate, RATE_RANGE)
  pitch = _check_range('pitch', pitch, PITCH_RANGE)
  pitch_range = _check_range('pitch_range', pitch_range, RANGE_RANGE)
  with _LOCK:
    engine = _engine()
    engine.set_voice(voice)
    # Loading a voice may reset some parameters: set all of them each call.
    engine.set_parameter(_PARAM_RATE, rate)
    engine.set_parameter(_PARAM_PITCH, pitch)
    engine.set_parameter(_PARAM_RANGE, pitch_range)
    if noise_seed is not None:
      _LIBC.srand(ctypes.c_uint(noise_seed % 2**32))
    return engine.synth(text)
