r"""Speech synthesis throughput: clips per second per engine, and a build.

Three measurements, in one process, one after the other:

* engine only: every voice of every family of the 'mixed' population speaks
  the 36 words once (one `speak_many` call per voice, as a corpus build calls
  it per speaker); clips per second per engine (`clips_per_second`);
* full chain, per family: `population_corpus.synthesize_speaker` (engine,
  timbre, room impulse response, microphone, noise) for a few speakers of
  each family, one utterance of every word;
* a corpus build: a small 'mixed_unseen' pre-training corpus (seen speakers
  among the first --num_speakers, every word once, log-mel features) with
  --workers processes, beside the eSpeak-only corpus of the same size built
  the same way, as the reference.

Everything is timed on a shared machine: os.getloadavg() before and after
goes into the JSON, so compare ratios within one run rather than absolute
rates across runs.

    python -m benchmarks.synthesis_throughput \
        --out=benchmarks/results/synthesis/results.json
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time

from absl import flags
from absl import logging

from benchmarks import cli
from ondevice.data import engines
from ondevice.data import population as pop_lib
from ondevice.data import population_corpus as pc
from ondevice.data import speech_keywords as sk

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'benchmarks/results/synthesis/results.json',
                           'JSON path; the markdown table goes beside it.',
                           flag_values=FLAGS)
_SPEAKERS_PER_FAMILY = flags.DEFINE_integer(
    'speakers_per_family', 2, 'Speakers per family in the full-chain rows.',
    flag_values=FLAGS)
_NUM_SPEAKERS = flags.DEFINE_integer(
    'num_speakers', 16, 'Speaker indices of the timed corpus builds.',
    flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer('workers', 2, 'Processes of the builds.',
                                flag_values=FLAGS)


def _engine_rates() -> dict[str, dict]:
  """Engine-only clips per second, every voice of 'mixed' over all words."""
  out = {}
  for family in pop_lib.MIXED.families:
    engine = engines.ENGINES[family.engine]
    voices = [v + ('+m3' if family.engine == 'espeak' else '')
              for v in family.voices]
    start = time.perf_counter()
    for voice in voices:
      engine.speak_many(list(sk.WORDS), voice, [1.0] * len(sk.WORDS),
                        list(range(len(sk.WORDS))))
    seconds = time.perf_counter() - start
    entry = out.setdefault(family.engine, {'clips': 0, 'seconds': 0.0})
    entry['clips'] += len(voices) * len(sk.WORDS)
    entry['seconds'] += seconds
    logging.info('%s: %d voices in %.1f s', family.name, len(voices), seconds)
  for entry in out.values():
    entry['clips_per_second'] = entry['clips'] / entry['seconds']
  return out


def _chain_rates() -> dict[str, dict]:
  """Full-chain clips per second per family of 'mixed'."""
  config = sk.SpeechCorpusConfig(num_speakers=1000, utterances_per_word=1)
  out = {}
  for family in pop_lib.MIXED.families:
    indices = [i for i in range(1000) if pc.speaker_at(
        pop_lib.MIXED, 0, i).family == family.name][:_SPEAKERS_PER_FAMILY.value]
    start = time.perf_counter()
    clips = sum(len(pc.synthesize_speaker(config, pop_lib.MIXED, i)['y'])
                for i in indices)
    seconds = time.perf_counter() - start
    out[family.name] = {'clips': clips, 'seconds': seconds,
                        'clips_per_second': clips / seconds}
    logging.info('%s full chain: %s', family.name, out[family.name])
  return out


def _builds(cache_dir: str) -> dict[str, dict]:
  """Timed builds of the mixed_unseen and the eSpeak corpora, cold cache."""
  config = sk.SpeechCorpusConfig(num_speakers=_NUM_SPEAKERS.value,
                                 utterances_per_word=1)
  out = {}
  for name in ('mixed_unseen', 'espeak'):
    start = time.perf_counter()
    ds = sk.load_corpus(config, population=name, cache_dir=cache_dir,
                        num_workers=_WORKERS.value)
    seconds = time.perf_counter() - start
    out[name] = {'speakers': int(len(ds.clients())), 'clips': len(ds),
                 'seconds': seconds, 'clips_per_second': len(ds) / seconds,
                 'workers': _WORKERS.value,
                 'config': dataclasses.asdict(config)}
    logging.info('build %s: %s', name, out[name])
  return out


def _markdown(results: dict) -> str:
  lines = ['# Speech synthesis throughput', '',
           f"{results['date']}, {results['cpu_count']} CPUs, load average "
           f"{results['loadavg_before']} before and {results['loadavg_after']} "
           'after: a shared machine, so rates are indicative.', '',
           '| engine | clips | s | clips/s (1 process, engine only) |',
           '| --- | ---: | ---: | ---: |']
  for name, e in results['engines'].items():
    lines.append(f"| {name} | {e['clips']} | {e['seconds']:.1f} | "
                 f"{e['clips_per_second']:.1f} |")
  lines += ['', '| family | clips | s | clips/s (1 process, full chain) |',
            '| --- | ---: | ---: | ---: |']
  for name, e in results['full_chain'].items():
    lines.append(f"| {name} | {e['clips']} | {e['seconds']:.1f} | "
                 f"{e['clips_per_second']:.1f} |")
  lines += ['', '| corpus build (log-mel, cold cache) | speakers | clips | '
            'workers | s | clips/s |', '| --- | ---: | ---: | ---: | ---: | '
            '---: |']
  for name, e in results['builds'].items():
    lines.append(f"| {name} | {e['speakers']} | {e['clips']} | "
                 f"{e['workers']} | {e['seconds']:.1f} | "
                 f"{e['clips_per_second']:.1f} |")
  lines += ['', _extrapolation(results)]
  return '\n'.join(lines) + '\n'


def _extrapolation(results: dict) -> str:
  """Full-size build times at the measured build rates (an estimate)."""
  builds = results['builds']
  default = 200 * len(sk.WORDS) * 3  # configs' num_speakers, words, utts
  seen = builds['mixed_unseen']['speakers'] / builds['mixed_unseen']['config'][
      'num_speakers']
  mixed = seen * default
  minutes = lambda clips, name: clips / builds[name]['clips_per_second'] / 60
  return (f'At these build rates, the default eSpeak corpus (200 speakers, '
          f'{default} clips) would take about '
          f"{minutes(default, 'espeak'):.0f} min and a mixed_unseen "
          f'pre-training corpus of 200 speaker indices ({seen:.0%} seen, '
          f"about {mixed:.0f} clips) about {minutes(mixed, 'mixed_unseen'):.0f}"
          ' min on this loaded machine: extrapolated, not measured; small '
          'builds include fixed costs (spawning workers, compiling the '
          'log-mel front end).')


def main(argv):
  del argv
  results = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'), 'cpu_count': os.cpu_count(),
             'platform': platform.platform(),
             'loadavg_before': [round(x, 2) for x in os.getloadavg()],
             'versions': {n: e.version() for n, e in engines.ENGINES.items()}}
  results['engines'] = _engine_rates()
  results['clips_per_second'] = {
      n: round(e['clips_per_second'], 2) for n, e in results['engines'].items()}
  results['full_chain'] = _chain_rates()
  with tempfile.TemporaryDirectory(prefix='synthesis_bench_') as cache_dir:
    results['builds'] = _builds(cache_dir)
  results['loadavg_after'] = [round(x, 2) for x in os.getloadavg()]
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w',
            encoding='utf-8') as f:
    f.write(_markdown(results))
  print(_markdown(results))


if __name__ == '__main__':
  cli.run(main, FLAGS)
