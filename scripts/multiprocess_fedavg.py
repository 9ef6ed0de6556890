r"""FedAvg rounds on a client store, in one of several cooperating processes.

Start one copy per process (scripts/launch_local.sh does it on one host):

    python scripts/multiprocess_fedavg.py --coordinator=127.0.0.1:12355 \
        --num_processes=2 --process_id=0 --store=/tmp/store --cohort_size=10

Every process joins `jax.distributed` (process 0 hosts the coordinator),
builds one mesh with a 'clients' axis over all processes' devices, and runs
the 'sharded' execution strategy on it; each process reads only its own
clients of each cohort from the store. Process 0 writes the final server
params (`--out`, .npz, one array per param path) and the round metrics
(same path, .json).
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from fedjax_ext import distributed
from ondevice.data import client_store

_COORDINATOR = flags.DEFINE_string('coordinator', '127.0.0.1:12355',
                                   'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'This process.')
_TIMEOUT = flags.DEFINE_float('timeout_s', 60.0, 'Seconds to wait for the '
                              'coordinator and the other processes.')
_STORE = flags.DEFINE_string('store', None, 'ClientStore directory.')
_COHORT = flags.DEFINE_integer('cohort_size', 10, 'Clients per round.')
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 4, 'Examples per client.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds.')
_MODEL = flags.DEFINE_string('model', 'mlp_2k', 'ondevice.models preset.')
_STEPS = flags.DEFINE_integer('local_steps', 2, 'Local SGD steps.')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'Local batch size.')
_LR = flags.DEFINE_float('learning_rate', 0.05, 'Client learning rate.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of init, sampling, rounds.')
_OUT = flags.DEFINE_string('out', '', 'Process 0 writes params here (.npz).')


def _check_flags(store: client_store.ClientStore) -> None:
  """Bad flags fail here, before JAX joins other processes or compiles."""
  distributed.check_processes(_NUM_PROCESSES.value, _PROCESS_ID.value,
                              _COHORT.value)
  if _COHORT.value > store.num_clients:
    raise ValueError(
        f'--cohort_size={_COHORT.value} is larger than the population of '
        f'{store.num_clients} clients in {_STORE.value}; lower it.')


def main(argv):
  del argv
  if not _STORE.value:
    raise ValueError('--store is required: a ClientStore directory.')
  store = client_store.open_store(_STORE.value)
  _check_flags(store)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, _TIMEOUT.value)
  config = ml_collections.ConfigDict({
      'model': _MODEL.value, 'cohort_size': _COHORT.value,
      'max_examples_per_client': _MAX_EXAMPLES.value,
      'num_rounds': _ROUNDS.value, 'local_steps': _STEPS.value,
      'batch_size': _BATCH.value, 'learning_rate': _LR.value,
      'seed': _SEED.value})
  flat, history = distributed.fedavg_on_store(store, config,
                                              distributed.global_mesh())
  logging.info('Process %d done: %d rounds, last metrics %s.',
               jax.process_index(), len(history), history[-1])
  if _OUT.value and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    np.savez(_OUT.value, **flat)
    with open(os.path.splitext(_OUT.value)[0] + '.json', 'w') as f:
      json.dump({'rounds': history, 'process_count': jax.process_count(),
                 'device_count': jax.device_count()}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
