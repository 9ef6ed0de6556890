r"""Bytes a client sends per round in the federated KWS run, per update scheme.

Runs `configs/fed_kws.py` for a few rounds with `config.trainable` set to
each scheme (and the full model with int8-compressed deltas), and reads the
bytes per client the round itself reported (`metrics.jsonl`,
`bytes_per_client`), next to the float32 size of the trainable leaves. The
rounds are real: the clients train only the scheme's leaves and send only
those, so the numbers are what `fedjax_ext` accounts, not a formula.

    python -m benchmarks.fed_sparse_bytes \
        --out=benchmarks/results/fed_sparse_bytes/results.json

writes results.json and results.md (the run directories go under --workdir).
"""
from __future__ import annotations

import datetime
import json
import os

from absl import flags

from benchmarks import cli
from configs import fed_kws
from fedjax_ext import experiment
from ondevice import logs
from ondevice import metric_writer

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string('out', 'results.json', 'JSON path; the markdown '
                           'goes beside it.', flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fed_sparse_bytes',
                               'Where the runs write.', flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds per scheme.',
                               flag_values=FLAGS)

# (label, config.trainable.name, its arguments, compression name, its
# arguments).
SCHEMES = (
    ('full', 'full', {}, 'none', {}),
    ('full + int8 deltas', 'full', {}, 'quantize', {'bits': 8}),
    ('bias_only', 'bias_only', {}, 'none', {}),
    ('last_k (k=2)', 'last_k', {'k': 2}, 'none', {}),
    ('classifier_only', 'classifier_only', {}, 'none', {}),
    ('norm_only', 'norm_only', {}, 'none', {}),
)


def run_scheme(label: str, trainable: str, kwargs: dict, compression: str,
               compression_kwargs: dict, rounds: int, workdir: str) -> dict:
  config = fed_kws.get_config()
  config.trainable.name = trainable
  config.trainable[trainable].update(kwargs)
  config.compression.name = compression
  config.compression[compression].update(compression_kwargs)
  config.num_rounds = rounds
  config.eval_every = rounds
  config.checkpoint_every = rounds
  out = experiment.run(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  sent = {r['bytes_per_client'] for r in records}
  if len(sent) != 1:
    raise RuntimeError(f'{label}: bytes per client changed between rounds: '
                       f'{sorted(sent)}.')
  full = 4 * out['metrics']['num_params']
  return {'scheme': label,
          'trainable_float32_bytes': int(
              out['metrics']['bytes_per_client_float32']),
          'bytes_per_client_per_round': int(sent.pop()),
          'fraction_of_full_model': None, 'full_model_bytes': full}


def main(argv):
  del argv
  logs.setup_experiment_logging()
  rows = []
  for label, trainable, kwargs, compression, compression_kwargs in SCHEMES:
    workdir = os.path.join(_WORKDIR.value,
                           label.replace(' ', '_').replace('+', 'plus'))
    row = run_scheme(label, trainable, kwargs, compression,
                     compression_kwargs, _ROUNDS.value, workdir)
    row['fraction_of_full_model'] = round(
        row['bytes_per_client_per_round'] / row['full_model_bytes'], 4)
    rows.append(row)
  results = {'date': datetime.datetime.now().isoformat(timespec='seconds'),
             'config': 'configs/fed_kws.py (DS-CNN S, 36 keywords)',
             'rounds': _ROUNDS.value, 'rows': rows}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(results, f, indent=2)
  md = '\n'.join([
      '# Bytes a client sends per round, by update scheme (federated KWS)',
      '', f"{results['date']}. `configs/fed_kws.py` run for "
      f"{_ROUNDS.value} rounds per scheme; bytes per client as the round "
      'reported them (int8 deltas: one byte per value plus a float32 scale '
      'per tensor).', '', metric_writer.markdown_table(rows), ''])
  with open(os.path.splitext(_OUT.value)[0] + '.md', 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  cli.run(main, FLAGS)
