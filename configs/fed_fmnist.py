r"""Federated Fashion-MNIST with Dirichlet(alpha) label skew over N clients.

    python -m experiments.federated --config=configs/fed_fmnist.py \
        --workdir=/tmp/fed_fmnist
    python -m experiments.federated --config=configs/fed_fmnist.py:smoke \
        --config.partition.alpha=0.1 --workdir=/tmp/run
    python -m experiments.federated --config=configs/fed_fmnist.py:smoke \
        --config.aggregator.name=median --workdir=/tmp/run

Parts chosen by name are a `name` plus one sub-config per choice (see
configs/fed_kws.py for the flags of each).
"""
import ml_collections

from configs import common
from fedjax_ext import personalization
from fedjax_ext import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', data_dir='', max_train=0, max_test=0))
  config.partition = ml_collections.ConfigDict(dict(
      kind='dirichlet', num_clients=500, alpha=0.5, seed=0))
  config.model = 'cnn_20k'
  config.norm = 'none'
  config.model_kwargs = ml_collections.ConfigDict()
  config.quant = 'none'
  # A sparse_updates preset; clients train and send only its leaves.
  config.trainable = training.trainable_options('full')
  config.algorithm = training.algorithm_options('fedavg')
  config.server_learning_rate = 1.0
  config.client_learning_rate = 0.05
  config.client_momentum = 0.9
  config.local = ml_collections.ConfigDict(dict(
      batch_size=20, num_steps=0, num_epochs=1,
      # fedjax_ext.client.LocalConfig: how local steps loop and convolve,
      # and how a short last batch is filled ('fill': FedJAX's way).
      loop='auto', conv='auto', last_batch='mask'))
  config.cohort_size = 50
  config.weighted_sampling = False
  config.max_examples_per_client = 200
  config.num_rounds = 200
  config.dropout_rate = 0.0
  config.execution = 'auto'
  config.host_threads = 1  # >1: cohort parts run at once (execution.py).
  config.aggregator = training.aggregator_options('mean')
  config.compression = training.compression_options('none')
  config.dp = training.dp_options()
  config.secure_aggregation = training.secure_aggregation_options()
  # Held-out users adapt on K examples per class at each evaluation.
  config.personalize = personalization.default_options()
  config.init = ''  # Another run's workdir to start from (ondevice.init_from).
  config.eval_every = 10
  config.eval_batch_size = 1000
  config.checkpoint_every = 50
  config.seed = 0

  if args.smoke:
    config.data.max_train = 600
    config.data.max_test = 200
    config.partition.num_clients = 20
    config.cohort_size = 5
    config.local.num_epochs = 1
    config.local.batch_size = 10
    config.max_examples_per_client = 60
    config.num_rounds = 4
    config.eval_every = 2
    config.checkpoint_every = 2
    config.eval_batch_size = 200
  return config
