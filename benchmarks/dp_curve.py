r"""DP-FedAvg keyword spotting against epsilon on a large eSpeak population.

1. Builds (or resumes) a client store of `--num_speakers` eSpeak speakers, one
   client per speaker (`ondevice.data.client_store`, int16 log-mel, sharded,
   memory-mapped). Speaker i is `speech_keywords.synthesize_speaker(config, i)`
   of a corpus config whose words are the 10 keywords yes, no, up, down, left,
   right, on, off, stop, go plus the 'unknown' words bed and bird (stored as
   one class, `_unknown_`): 11 classes, `--utterances_per_word` clips of each
   word per speaker. Shards are synthesised by spawned worker processes
   (`--num_workers`); a partly built store resumes from its last whole shard.
   Synthesis clips per second (clips kept, eSpeak calls for the words not kept
   included in the time) are recorded.
2. Runs federated KWS on that store (`fedjax_ext.experiment.run`,
   configs/fed_store.py: DS-CNN, `--norm` (group by default); overridden:
   the server optimiser `--algorithm` (FedAvgM by default), its rates, width
   `--channels`, `--local_steps`, cohort `--cohort`, `--rounds`):
   one run without DP and one per `--epsilons` target with delta =
   1 / num_speakers, each with the smallest noise multiplier whose epsilon
   after `--rounds` rounds (the RDP accountant of the training,
   `privacy.epsilon_curve`, cohorts drawn without replacement from the
   training clients) is <= the target. Each run has its own workdir under
   `--workdir`/<settings>/cohort_<m>_rounds_<T>/; a finished run is
   reused.
3. Sets this cohort's rows of `dp_curve` (cohort, epsilon, noise multiplier,
   accuracy, no-DP accuracy) and `dp_curve_detail.by_cohort`, and
   `synthesis_clips_per_second`, in `--out_dir`/results.json (every other
   key and other cohorts' rows kept: run once per `--cohort`), rewrites the
   DP section of results.md and plots accuracy against epsilon, one line per
   cohort (dp_curve.png).

    python -m benchmarks.dp_curve --workdir=/tmp/dp_curve

The defaults (10,000 speakers x 24 clips, cohort 100, 300 rounds, FedAvgM,
adaptive clipping, epsilons 2, 4, 8: four runs of about 9 minutes each on 2
CPU cores) follow synthesis (about 7 minutes, skipped by a rerun). The
cohort-500 rows of benchmarks/results/scale came from a second invocation:

    python -m benchmarks.dp_curve --workdir=/tmp/dp_curve --cohort=500 \
        --rounds=80 --epsilons=8 --noadaptive_clip

`--smoke` (60 speakers, cohort 10, 4 rounds, epsilons 4 and 8) writes only
under `--workdir`.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import multiprocessing
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import flags
from absl import logging
import numpy as np

from benchmarks import cli
from benchmarks import outputs
from fedjax_ext import privacy
from ondevice.data import client_store
from ondevice.data import speech_keywords

KEYWORDS = ('yes', 'no', 'up', 'down', 'left', 'right', 'on', 'off', 'stop',
            'go')
UNKNOWN_WORDS = ('bed', 'bird')
CLASS_NAMES = KEYWORDS + ('_unknown_',)
LOG_MEL_RANGE = (-16.0, 8.0)   # int16 quantiser range of every mel bin
FEATURE_SHAPE = (98, 40)
DP_SECTION = '## DP federated KWS against epsilon'
ALGORITHM_NAMES = {'fedavg': 'FedAvg', 'fedavgm': 'FedAvgM (server momentum '
                   '0.9)', 'fedadam': 'FedAdam'}

# This script's own flags (benchmarks/cli.py): other benchmarks define
# 'workdir', 'rounds' or 'local_steps' too, with other defaults.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/dp_curve',
                               'Store, runs and (with --smoke) results.',
                               flag_values=FLAGS)
_OUT_DIR = flags.DEFINE_string('out_dir', 'benchmarks/results/scale',
                               'results.json / results.md to merge into.',
                               flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny sizes; writes only under '
                           '--workdir.', flag_values=FLAGS)
_NUM_SPEAKERS = flags.DEFINE_integer('num_speakers', 10000, 'Speakers.',
                                     flag_values=FLAGS)
_UTTERANCES = flags.DEFINE_integer('utterances_per_word', 2,
                                   'Clips of each word per speaker.',
                                   flag_values=FLAGS)
_PER_SHARD = flags.DEFINE_integer('speakers_per_shard', 250,
                                  'Speakers per store shard.',
                                  flag_values=FLAGS)
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2,
                                    'Synthesis worker processes.',
                                    flag_values=FLAGS)
_EVAL_SPEAKERS = flags.DEFINE_integer('eval_speakers', 200,
                                      'Last speakers held out for eval.',
                                      flag_values=FLAGS)
_COHORT = flags.DEFINE_integer('cohort', 100, 'Clients per round.',
                               flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 300, 'Rounds of every run.',
                               flag_values=FLAGS)
_EPSILONS = flags.DEFINE_list('epsilons', ['2', '4', '8'],
                              'Target epsilons of the DP runs.',
                              flag_values=FLAGS)
_CLIP_NORM = flags.DEFINE_float('clip_norm', 0.5, 'DP clip norm (the '
                                'initial one with --adaptive_clip).',
                                flag_values=FLAGS)
_ADAPTIVE = flags.DEFINE_bool(
    'adaptive_clip', True,
    'Adaptive clipping (Andrew et al. 2021) at the median update norm: the '
    'clip follows the client update norms, which grow as the model leaves '
    'its early plateau; part of the noise budget privatises the count.',
    flag_values=FLAGS)
_NORM = flags.DEFINE_enum(
    'norm', 'group', ['batch', 'group'],
    'The model\'s normalisation. With batch norm, whose statistics DP clips '
    'and noises with the weights, the DP runs stayed at chance (train '
    'accuracy 0.08 after 40 rounds at epsilon 4) while the run without DP '
    'learned (0.70).', flag_values=FLAGS)
_ALGORITHM = flags.DEFINE_enum(
    'algorithm', 'fedavgm', ['fedavg', 'fedavgm', 'fedadam'],
    'Server optimiser. FedAdam divides every coordinate of the aggregate by '
    'its running RMS, which under DP is mostly the noise, so each noisy '
    'coordinate becomes a step of full size: at epsilon 4 and 8 FedAdam '
    'stayed at chance. FedAvgM (server SGD with momentum 0.9, as in McMahan '
    'et al. 2018) averages the noise out over rounds.', flag_values=FLAGS)
_SERVER_LR = flags.DEFINE_float(
    'server_learning_rate', None,
    'Server rate; default 1.0 for fedavg and fedavgm, 0.03 for fedadam.',
    flag_values=FLAGS)
_CLIENT_LR = flags.DEFINE_float(
    'client_learning_rate', 0.2,
    'Client momentum-SGD rate. At 0.05 the server model of FedAvgM sat at '
    'chance for 48 rounds; at 0.2 it was above chance by round 32.',
    flag_values=FLAGS)
_CHANNELS = flags.DEFINE_integer('channels', 16, 'DS-CNN width.',
                                 flag_values=FLAGS)
_SEED = flags.DEFINE_integer(
    'seed', 0, 'config.seed of every run (init, cohorts, noise); a seed > 0 '
    'writes its runs and results.json rows apart from seed 0.',
    flag_values=FLAGS)
_LOCAL_STEPS = flags.DEFINE_integer('local_steps', 4, 'Local SGD steps.',
                                    flag_values=FLAGS)


def corpus_config(num_speakers: int, utterances_per_word: int,
                  seed: int = 0) -> speech_keywords.SpeechCorpusConfig:
  """The eSpeak corpus: keywords plus the unknown words, in label order."""
  return speech_keywords.SpeechCorpusConfig(
      num_speakers=num_speakers, utterances_per_word=utterances_per_word,
      words=KEYWORDS + UNKNOWN_WORDS, seed=seed)


def speaker_client(config: speech_keywords.SpeechCorpusConfig,
                   index: int) -> dict[str, Any]:
  """Client `index`: its log-mel clips, labels (unknown words merged), id."""
  clips = speech_keywords.synthesize_speaker(config, index)
  x = speech_keywords.log_mel_int16(clips['waveform']).astype(np.float32)
  y = np.minimum(clips['y'], len(KEYWORDS)).astype(np.int32)
  return {'x': x, 'y': y, 'id': index}


def make_shard_fn(config: speech_keywords.SpeechCorpusConfig,
                  speakers_per_shard: int, pool=None,
                  stats: dict[str, float] | None = None
                  ) -> Callable[[int], list[dict[str, Any]]]:
  """`make_shard(i)` for `client_store.build_store`: speakers of shard i.

  `pool` (a spawn-context multiprocessing pool) synthesises speakers in
  parallel; `stats` accumulates 'clips' and 'seconds' of synthesis.
  """
  job = functools.partial(speaker_client, config)

  def make_shard(index: int) -> list[dict[str, Any]]:
    start = time.perf_counter()
    ids = range(index * speakers_per_shard,
                min(config.num_speakers, (index + 1) * speakers_per_shard))
    clients = list(pool.imap(job, ids) if pool is not None else map(job, ids))
    if stats is not None:
      stats['clips'] += sum(len(c['y']) for c in clients)
      stats['seconds'] += time.perf_counter() - start
      logging.info('Shard %d: %d speakers; %.0f clips/s so far.', index,
                   len(clients), stats['clips'] / stats['seconds'])
    return clients

  return make_shard


def build_speech_store(root: str, config: speech_keywords.SpeechCorpusConfig,
                       speakers_per_shard: int, num_workers: int
                       ) -> tuple[client_store.ClientStore, dict[str, float]]:
  """Builds or resumes the store; returns it and this call's synthesis stats."""
  stats = {'clips': 0, 'seconds': 0.0}
  quantizer = client_store.Quantizer.from_range(
      np.full(FEATURE_SHAPE[-1], LOG_MEL_RANGE[0]),
      np.full(FEATURE_SHAPE[-1], LOG_MEL_RANGE[1]))
  pool = (multiprocessing.get_context('spawn').Pool(num_workers)
          if num_workers > 1 else None)
  try:
    store = client_store.build_store(
        root, -(-config.num_speakers // speakers_per_shard),
        make_shard_fn(config, speakers_per_shard, pool, stats),
        feature_shape=FEATURE_SHAPE, class_names=CLASS_NAMES,
        quantizer=quantizer,
        info={'corpus': 'speech_keywords', 'num_speakers': config.num_speakers,
              'utterances_per_word': config.utterances_per_word,
              'words': list(config.words), 'seed': config.seed,
              'speakers_per_shard': speakers_per_shard,
              'unknown_words': list(UNKNOWN_WORDS)})
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  return store, stats


def calibrate_noise(target_epsilon: float, cohort_size: int,
                    population_size: int, rounds: int, delta: float,
                    rtol: float = 1e-4) -> float:
  """Smallest noise multiplier (to `rtol`) whose epsilon is <= the target.

  Epsilon is the training's own (`privacy.epsilon_curve`: cohorts of
  `cohort_size` drawn without replacement from `population_size`, RDP),
  which falls as the noise multiplier grows, so bisection finds it.
  """
  def epsilon(z):
    return privacy.epsilon_curve(z, cohort_size, population_size, delta)(
        rounds)

  lo, hi = 0.0, 1.0
  while epsilon(hi) > target_epsilon:
    lo, hi = hi, hi * 2.0
    if hi > 1e4:
      raise ValueError(f'No noise multiplier up to {hi:g} reaches epsilon '
                       f'{target_epsilon}.')
  while hi - lo > rtol * hi:
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if epsilon(mid) <= target_epsilon else (mid, hi)
  return hi


DEFAULT_SERVER_LR = {'fedavg': 1.0, 'fedavgm': 1.0, 'fedadam': 0.03}


def server_learning_rate() -> float:
  """--server_learning_rate, or the default of --algorithm."""
  if _SERVER_LR.value is not None:
    return _SERVER_LR.value
  return DEFAULT_SERVER_LR[_ALGORITHM.value]


def run_config(store_root: str, eval_speakers: int, cohort: int, rounds: int,
               channels: int, local_steps: int, smoke: bool):
  """configs/fed_store.py with the model and schedule of this benchmark."""
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from configs import fed_store
  from fedjax_ext import training
  # pylint: enable=g-import-not-at-top
  config = fed_store.get_config('')
  config.data.store = store_root
  config.data.eval_clients = eval_speakers
  # fed_store's recipe with --norm and the server optimiser of --algorithm,
  # at a width and local step count whose round at cohort 100 is cheap on
  # a CPU.
  config.model_kwargs = ml_collections.ConfigDict(
      {'channels': channels, 'first_stride': (4, 4)})
  config.norm = _NORM.value
  config.algorithm = training.algorithm_options(_ALGORITHM.value)
  config.server_learning_rate = server_learning_rate()
  config.client_learning_rate = _CLIENT_LR.value
  config.seed = _SEED.value
  config.local.batch_size = 8
  config.local.num_steps = local_steps
  config.max_examples_per_client = 32
  config.cohort_size = cohort
  config.num_rounds = rounds
  config.eval_every = max(1, rounds // (2 if smoke else 5))
  config.checkpoint_every = max(1, min(50, rounds))
  return config


def with_dp(config, noise_multiplier: float, clip_norm: float, delta: float,
            adaptive: bool = False):
  """A copy of `config` with DP-FedAvg on (fixed or adaptive clip; the
  adaptive one tracks the median update norm)."""
  config = config.copy_and_resolve_references()
  config.dp.enabled = True
  config.dp.noise_multiplier = float(noise_multiplier)
  config.dp.clip_norm = float(clip_norm)
  config.dp.adaptive = bool(adaptive)
  config.dp.target_quantile = 0.5
  config.dp.delta = float(delta)
  return config


def run_once(config, workdir: str) -> dict[str, Any]:
  """One federated run, or the record of the same run finished before."""
  # pylint: disable=g-import-not-at-top
  from fedjax_ext import experiment
  # pylint: enable=g-import-not-at-top
  record_path = os.path.join(workdir, 'dp_curve_run.json')
  wanted = json.loads(config.to_json())
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record['config'] != wanted:
      raise ValueError(f'{workdir} holds a run of another config; pass a new '
                       '--workdir (or delete that run directory).')
    logging.info('Reusing the finished run in %s.', workdir)
    return record
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  metrics = experiment.run(config, workdir)['metrics']
  record = {'config': wanted, 'metrics': _jsonable(metrics),
            'wall_seconds': time.perf_counter() - start}
  with open(record_path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(record_path + '.tmp', record_path)
  return record


def _jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in metrics.items():
    value = value.item() if hasattr(value, 'item') else value
    out[key] = None if isinstance(value, float) and not math.isfinite(
        value) else value
  return out


def merge_results(path: str, new: Mapping[str, Any]) -> dict[str, Any]:
  """results.json at `path` with `new` keys set and every other key kept."""
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results.update(new)
  return results


def merge_markdown(path: str, section: str) -> str:
  """results.md at `path` with its DP section replaced by `section`."""
  text = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  text = text.split(DP_SECTION, 1)[0].rstrip('\n')
  return (text + '\n\n' if text else '') + section


def run_key(cohort: int, seed: int = 0) -> str:
  """The `dp_curve_detail.by_cohort` key of a cohort's runs at a seed."""
  return str(cohort) if not seed else f'{cohort}, seed {seed}'


def merge_cohort(results: Mapping[str, Any], cohort: int,
                 detail: Mapping[str, Any], curve: Sequence[Mapping[str, Any]],
                 seed: int = 0) -> dict[str, Any]:
  """`dp_curve` and `dp_curve_detail` with this cohort's (and seed's) runs.

  Rows of other cohorts and seeds are kept, so a curve at cohort 100 and one
  at 500 come from two invocations; rows without a cohort (an earlier
  layout) are dropped with their detail.
  """
  by_cohort = dict(results.get('dp_curve_detail', {}).get('by_cohort', {}))
  by_cohort[run_key(cohort, seed)] = dict(detail, cohort=cohort, seed=seed)
  rows = [r for r in results.get('dp_curve', []) if 'cohort' in r and (
      r['cohort'], r.get('seed', 0)) != (cohort, seed)]
  rows += [{'cohort': cohort, 'seed': seed, 'epsilon': r['epsilon'],
            'noise_multiplier': r['noise_multiplier'],
            'accuracy': r['accuracy'],
            'no_dp_accuracy': detail['no_dp_accuracy']} for r in curve]
  rows.sort(key=lambda r: (r['cohort'], r.get('seed', 0), r['epsilon']))
  order = lambda kv: (kv[1].get('cohort', 0), kv[1].get('seed', 0))
  return {'dp_curve': rows, 'dp_curve_detail': {'by_cohort': dict(
      sorted(by_cohort.items(), key=order))}}


def gap_at_8(detail: Mapping[str, Any]) -> float | None:
  """No-DP accuracy minus the best DP accuracy at epsilon <= 8."""
  best = [r['accuracy'] for r in detail['runs'] if r['epsilon'] <= 8]
  return detail['no_dp_accuracy'] - max(best) if best else None


def _setup_text(s: Mapping[str, Any]) -> str:
  """One cohort's setup, in words."""
  return (
      f"{s['num_speakers']:,} eSpeak speakers (one client each; the last "
      f"{s['eval_speakers']} held out for evaluation), words "
      f"{', '.join(KEYWORDS)} + unknown ({', '.join(UNKNOWN_WORDS)}), "
      f"{s['utterances_per_word']} clips of each word per speaker, int16 "
      f"log-mel in a client store. {ALGORITHM_NAMES[s['algorithm']]} "
      f"(server lr {s['server_learning_rate']:g}; clients: momentum SGD lr "
      f"{s['client_learning_rate']:g}, {s['local_steps']} local steps of "
      f"batch 8) of {s['model']} ({s['num_params']} params), "
      f"{s['rounds']} rounds. DP: "
      + (f"adaptive clip (median, from {s['clip_norm']:g})"
         if s.get('adaptive_clip') else f"fixed clip {s['clip_norm']:g}")
      + f", delta "
      f"1/{s['num_speakers']}, noise multiplier calibrated so that the RDP "
      'epsilon of cohorts drawn without replacement (the accountant of the '
      'training) is <= the target.')


def dp_markdown(by_cohort: Mapping[str, Mapping[str, Any]],
                clips_per_second: float | None) -> str:
  """The DP section of results.md: one table row per run, every cohort."""
  lines = [DP_SECTION, '']
  for cohort, detail in by_cohort.items():
    lines += [f"**Cohort {cohort}** (generated {detail['generated']}): "
              + _setup_text(detail['setup']), '']
  lines += ['| cohort | target epsilon | noise multiplier | noise std of the '
            'mean | run epsilon | accuracy | wall s |',
            '|---|---|---|---|---|---|---|']
  for cohort, detail in by_cohort.items():
    lines.append(f"| {cohort} | no DP | 0 | 0 | inf | "
                 f"{detail['no_dp_accuracy']:.4f} | "
                 f"{detail['no_dp_wall_seconds']:.0f} |")
    clip = detail['setup']['clip_norm']
    for row in detail['runs']:
      std = ('adaptive' if detail['setup'].get('adaptive_clip') else
             f"{row['noise_multiplier'] * clip / detail['cohort']:.5f}")
      lines.append(
          f"| {cohort} | {row['epsilon']:g} | {row['noise_multiplier']:.4f} "
          f"| {std} | "
          f"{row['run_epsilon']:.3f} | {row['accuracy']:.4f} | "
          f"{row['wall_seconds']:.0f} |")
  lines += ['', f"Synthesis: {clips_per_second or float('nan'):.0f} clips/s "
            '(clips kept; the eSpeak calls of the words not kept are in the '
            'time).', '']
  for cohort, detail in by_cohort.items():
    gap = gap_at_8(detail)
    if gap is not None:
      lines.append(f"- Cohort {cohort}: DP at epsilon <= 8 within "
                   f"{100 * gap:.1f} points of no DP "
                   f"({'met' if gap <= 0.05 else 'NOT met'}: <= 5 points).")
  return '\n'.join(lines + [''])


def plot(path: str, by_cohort: Mapping[str, Mapping[str, Any]]) -> None:
  """Accuracy against epsilon per cohort, each with its no-DP accuracy."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  # pylint: enable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for i, (cohort, detail) in enumerate(by_cohort.items()):
    color = f'C{i}'  # `cohort` is the run key: '100' or '100, seed 1'.
    runs, s = detail['runs'], detail['setup']
    name = (f"cohort {cohort}, {s['rounds']} rounds, "
            f"{'adaptive' if s.get('adaptive_clip') else 'fixed'} clip")
    ax.plot([r['epsilon'] for r in runs], [r['accuracy'] for r in runs],
            'o-', color=color, label=f'DP-FedAvg, {name}')
    ax.axhline(detail['no_dp_accuracy'], color=color, ls='--',
               label=f'no DP, {name}')
  ax.set_xlabel('epsilon (delta = 1 / population)')
  ax.set_ylabel('test accuracy')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _sizes() -> dict[str, Any]:
  """The flags' sizes, or the smoke sizes."""
  if _SMOKE.value:
    return dict(num_speakers=60, speakers_per_shard=20, eval_speakers=10,
                cohort=10, rounds=4, epsilons=[4.0, 8.0])
  return dict(num_speakers=_NUM_SPEAKERS.value,
              speakers_per_shard=_PER_SHARD.value,
              eval_speakers=_EVAL_SPEAKERS.value, cohort=_COHORT.value,
              rounds=_ROUNDS.value,
              epsilons=sorted(float(e) for e in _EPSILONS.value))


def _synthesis_rate(workdir: str, stats: Mapping[str, float]) -> float | None:
  """Clips/s over every build session of this store (kept in the workdir)."""
  path = os.path.join(workdir, 'synthesis.json')
  total = {'clips': 0, 'seconds': 0.0}
  if os.path.exists(path):
    with open(path) as f:
      total = json.load(f)
  total = {k: total[k] + stats[k] for k in total}
  with open(path, 'w') as f:
    json.dump(total, f)
  return total['clips'] / total['seconds'] if total['seconds'] else None


def _runs(sizes, store, base_config) -> tuple[dict, list]:
  """The no-DP run and one DP run per target epsilon."""
  workdir, population = _WORKDIR.value, store.num_clients - sizes[
      'eval_speakers']
  delta = 1.0 / sizes['num_speakers']
  no_dp = run_once(base_config, run_dir(workdir, sizes, None))
  curve = []
  for target in sizes['epsilons']:
    z = calibrate_noise(target, sizes['cohort'], population, sizes['rounds'],
                        delta)
    record = run_once(with_dp(base_config, z, _CLIP_NORM.value, delta,
                              _ADAPTIVE.value),
                      run_dir(workdir, sizes, target))
    m = record['metrics']
    if m['dp_epsilon'] > target:
      raise RuntimeError(f'The run at target epsilon {target} spent '
                         f"{m['dp_epsilon']}.")
    curve.append({'epsilon': target, 'noise_multiplier': z,
                  'accuracy': m['test_accuracy'],
                  'run_epsilon': m['dp_epsilon'],
                  'wall_seconds': record['wall_seconds'],
                  'train_seconds': m['train_seconds']})
    logging.info('epsilon %g: z %.4f, accuracy %.4f.', target, z,
                 m['test_accuracy'])
  return no_dp, curve


def run_dir(workdir: str, sizes: Mapping[str, Any],
            epsilon: float | None) -> str:
  """The workdir of one run: the no-DP run (`epsilon` None) or a DP run.

  <settings>/cohort_<m>_rounds_<T>[_seed_<s>]/(no_dp | eps_<epsilon>), where
  <settings> names the flags that change the run (the clip only for DP runs,
  so every DP setting shares one no-DP run); earlier names are kept.
  """
  name = 'runs' if _NORM.value == 'batch' else f'runs_{_NORM.value}'
  if _ALGORITHM.value != 'fedadam':
    name += (f'_{_ALGORITHM.value}_slr{server_learning_rate():g}'
             f'_clr{_CLIENT_LR.value:g}')
    if epsilon is not None:
      name += f'_clip{_CLIP_NORM.value:g}'
      name += '_adaptive' if _ADAPTIVE.value else ''
  cohort = f"cohort_{sizes['cohort']}_rounds_{sizes['rounds']}" + (
      f'_seed_{_SEED.value}' if _SEED.value else '')
  leaf = 'no_dp' if epsilon is None else f'eps_{epsilon:g}'
  return os.path.join(workdir, name, cohort, leaf)


def _check(sizes: Mapping[str, Any]) -> None:
  """Bad flag values, before anything is synthesised."""
  if any(e <= 0 for e in sizes['epsilons']):
    raise ValueError(f"--epsilons={sizes['epsilons']}: every target must be "
                     '> 0.')
  if not 1 <= sizes['eval_speakers'] < sizes['num_speakers'] - sizes[
      'cohort'] + 1:
    raise ValueError(
        f"--eval_speakers={sizes['eval_speakers']} must leave at least "
        f"--cohort={sizes['cohort']} of the --num_speakers="
        f"{sizes['num_speakers']} speakers for training.")


def main(argv):
  del argv
  sizes = _sizes()
  _check(sizes)
  workdir = _WORKDIR.value
  corpus = corpus_config(sizes['num_speakers'], _UTTERANCES.value)
  store, stats = build_speech_store(os.path.join(workdir, 'store'), corpus,
                                    sizes['speakers_per_shard'],
                                    _NUM_WORKERS.value)
  clips_per_second = _synthesis_rate(workdir, stats)
  base = run_config(store.root, sizes['eval_speakers'], sizes['cohort'],
                    sizes['rounds'], _CHANNELS.value, _LOCAL_STEPS.value,
                    _SMOKE.value)
  no_dp, curve = _runs(sizes, store, base)
  detail = _detail(sizes, store, no_dp, curve)
  out_dir = os.path.join(workdir, 'results') if _SMOKE.value else (
      _OUT_DIR.value)
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, 'results.json')
  results = merge_results(out, {})
  results.update(merge_cohort(results, sizes['cohort'], detail, curve,
                              _SEED.value))
  results['synthesis_clips_per_second'] = clips_per_second
  by_cohort = results['dp_curve_detail']['by_cohort']
  outputs.write(out, results, merge_markdown(
      os.path.join(out_dir, 'results.md'),
      dp_markdown(by_cohort, clips_per_second)))
  plot(os.path.join(out_dir, 'dp_curve.png'), by_cohort)


def _detail(sizes, store, no_dp, curve) -> dict[str, Any]:
  """What results.json records of one cohort's runs."""
  m = no_dp['metrics']
  return {
      'no_dp_accuracy': m['test_accuracy'],
      'no_dp_wall_seconds': no_dp['wall_seconds'],
      'no_dp_train_seconds': m['train_seconds'],
      'seconds_per_round_no_dp': m['train_seconds'] / sizes['rounds'],
      'runs': curve, 'class_names': list(CLASS_NAMES),
      'generated': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'setup': {**sizes, 'utterances_per_word': _UTTERANCES.value,
                'model': f'ds_cnn_s (channels {_CHANNELS.value}, first '
                         f'stride 4x4, {_NORM.value} norm)',
                'algorithm': _ALGORITHM.value,
                'server_learning_rate': server_learning_rate(),
                'client_learning_rate': _CLIENT_LR.value,
                'num_params': m['num_params'], 'local_steps':
                _LOCAL_STEPS.value, 'clip_norm': _CLIP_NORM.value,
                'adaptive_clip': _ADAPTIVE.value,
                'delta': 1.0 / sizes['num_speakers'],
                'store_examples': store.num_examples}}


if __name__ == '__main__':
  cli.run(main, FLAGS)
