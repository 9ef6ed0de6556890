r"""Federated rounds on a client population stored on disk, over processes.

Clients live in a client store (`ondevice.data.client_store`: int16 log-mel
features, memory-mapped, read one cohort at a time), so the population is as
large as the disk allows and a round reads only its cohort's clients. The last
`data.eval_clients` clients of the store are held out for evaluation.

    python -c "from ondevice.data import client_store; \
        client_store.synthetic_store('/tmp/store', 1000)"
    python -m experiments.federated --config=configs/fed_store.py:smoke \
        --config.data.store=/tmp/store --workdir=/tmp/fed_store

Two processes on this machine (process 0 writes the run's files into its
workdir; `{process_id}` is replaced by each process's index):

    scripts/launch_local.sh 2 --flag_prefix=config.distributed. -- \
        python -m experiments.federated --config=configs/fed_store.py:smoke \
        --config.data.store=/tmp/store --workdir=/tmp/fed_store_{process_id}

`config.distributed` (`fedjax_ext.distributed.options`): with a coordinator
set, every process joins `jax.distributed`, the cohort is split over all
processes' devices ('sharded' execution), and each process reads only its
own clients; the cohort size must be a multiple of the process count.
"""
import ml_collections

from configs import common
from configs import fed_kws
from fedjax_ext import distributed
from fedjax_ext import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The main job's recipe (configs/fed_kws.py) on a client store."""
  args = common.parse_arg(arg, smoke=False)
  config = fed_kws.get_config()
  config.data = ml_collections.ConfigDict(dict(
      name='client_store', store='', eval_clients=40))
  # A store's clients are its own partition; held-out users are its last
  # eval_clients, evaluated by the server model.
  del config['partition']
  del config['personalize']
  config.distributed = distributed.options()

  if args.smoke:
    config.data.eval_clients = 4
    config.model = 'mlp_2k'
    config.norm = 'none'
    config.model_kwargs = ml_collections.ConfigDict()
    config.algorithm = training.algorithm_options('fedavg')
    config.server_learning_rate = 1.0
    config.client_momentum = 0.0
    config.cohort_size = 4
    config.local.num_steps = 2
    config.local.batch_size = 4
    config.max_examples_per_client = 8
    config.num_rounds = 2
    config.eval_every = 1
    config.checkpoint_every = 1
  return config
