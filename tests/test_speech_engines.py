"""Tests of the voice engines behind `ondevice.data.engines`."""
import numpy as np
import pytest

from ondevice.data import engines
from ondevice.data.engines import festival
from ondevice.data.engines import flite

# One voice per engine and kind: eSpeak with a variant, Flite 8 kHz diphone
# and clustergen, Festival diphone, HTS, and a foreign voice.
VOICES = [('espeak', 'de+f2'), ('flite', 'kal'), ('flite', 'slt'),
          ('festival', 'kal_diphone'), ('festival', 'cmu_us_slt_arctic_hts'),
          ('festival', 'czech_krb')]


@pytest.mark.parametrize('engine,voice', VOICES)
def test_engine_speaks_deterministically_at_16k(engine, voice):
  module = engines.ENGINES[engine]
  engines.check_voice(engine, voice, 'key')
  first = module.speak_many(['yes', 'house', 'yes'], voice, [1.0, 1.0, 1.5],
                            [1, 2, 1])
  second = module.speak_many(['yes', 'house', 'yes'], voice,
                             [1.0, 1.0, 1.5], [1, 2, 1])
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  yes, _, slow_yes = first
  assert yes.dtype == np.int16 and np.abs(yes).max() > 1000
  # 'yes' at 16 kHz lasts a few tenths of a second (with silences).
  assert 2000 < len(yes) < 24000
  # A 1.5 stretch lengthens the word, by its engine's own duration model
  # (silences and fixed-length parts stretch less).
  assert 1.15 < len(slow_yes) / len(yes) < 1.8


@pytest.mark.parametrize('engine,voice', [('flite', 'kal16'),
                                          ('festival', 'kal_diphone'),
                                          ('festival', 'upc_ca_ona_hts')])
def test_utterance_does_not_depend_on_what_came_before(engine, voice):
  # Not so for eSpeak NG, whose hidden state carries over between words:
  # population_corpus speaks its whole vocabulary in a fixed order.
  module = engines.ENGINES[engine]
  alone = module.speak_many(['no'], voice, [1.0], [5])[0]
  after = module.speak_many(['house', 'hey snapdragon', 'no'], voice,
                            [1.2, 0.9, 1.0], [1, 2, 5])[2]
  np.testing.assert_array_equal(alone, after)


def test_speak_is_speak_many_of_one():
  np.testing.assert_array_equal(
      engines.speak('flite', 'go', 'awb', 1.1),
      flite.speak_many(['go'], 'awb', [1.1], [0])[0])


def test_versions_name_the_engines():
  assert 'espeak-ng' in engines.ENGINES['espeak'].version()
  assert 'flite' in flite.version()
  assert 'Festival' in festival.version()
  assert 'festvox-kallpc16k' in festival.version()


def test_unknown_engine_and_voice_name_the_key():
  with pytest.raises(ValueError, match=r"config\.x: engine 'mbrola' is "
                     'unknown'):
    engines.get_engine('mbrola', 'config.x')
  with pytest.raises(ValueError, match=r"config\.x: flite has no voice "
                     "'joe'"):
    engines.check_voice('flite', 'joe', 'config.x')


def test_missing_packages_name_the_debian_package(monkeypatch, tmp_path):
  monkeypatch.setattr(flite.shutil, 'which', lambda name: None)
  with pytest.raises(ValueError, match='apt-get install flite'):
    engines.check_voice('flite', 'slt', 'config.x')
  monkeypatch.undo()
  monkeypatch.setattr(festival, '_VOICE_ROOT', str(tmp_path))
  with pytest.raises(ValueError, match='apt-get install festvox-czech-krb'):
    engines.check_voice('festival', 'czech_krb', 'config.x')
  monkeypatch.setattr(festival.shutil, 'which', lambda name: None)
  with pytest.raises(ValueError, match='apt-get install festival'):
    engines.check_voice('festival', 'czech_krb', 'config.x')


def test_festival_keeps_clips_before_a_crash_and_nudges_the_crashing_one(
    monkeypatch):
  # A voice that segfaults on 'down' at stretch 1.0: the process dies after
  # writing the clips before it. Each clip here encodes (text, stretch).
  calls = []

  def fake_run(texts, voice, stretches):
    calls.append((list(texts), [round(s, 6) for s in stretches]))
    out = []
    for text, stretch in zip(texts, stretches):
      if text == 'down' and stretch == 1.0:
        return out, 'exit -11: segfault'
      out.append(np.array([len(text), round(stretch * 1e6)]))
    return out, ''

  monkeypatch.setattr(festival, '_run', fake_run)
  out = festival.speak_many(['yes', 'down', 'go'], 'kal_diphone',
                            [1.2, 1.0, 0.9], [0, 0, 0])
  assert [o.tolist() for o in out] == [[3, 1200000], [4, 1030000],
                                       [2, 900000]]
  # One batch up to the crash, the crashing text alone at 1.03, the rest.
  assert calls == [(['yes', 'down', 'go'], [1.2, 1.0, 0.9]),
                   (['down'], [1.03]), (['go'], [0.9])]


def test_festival_raises_when_a_text_crashes_every_retry(monkeypatch):
  monkeypatch.setattr(festival, '_run',
                      lambda texts, voice, stretches: ([], 'exit -11'))
  with pytest.raises(RuntimeError, match="failed on 'down'"):
    festival.speak_many(['down'], 'kal_diphone', [1.0], [0])
