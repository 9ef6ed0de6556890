r"""Federated keyword spotting: every synthesised speaker is one client.

The project's main job (`make demo`). FedAdam (Reddi et al. 2021) over DS-CNN
S: 10 speakers a round, each taking 16 local momentum-SGD steps of 8 examples;
the server model is evaluated on the 40 speakers that never took part in
training, the same held-out split as configs/kws_central.py. Measured runs
and the tuning behind these settings: benchmarks/results/fed_kws/.

    python -m experiments.federated --config=configs/fed_kws.py \
        --workdir=/tmp/fed_kws
    python -m experiments.federated --config=configs/fed_kws.py:smoke \
        --config.algorithm.name=fedprox --config.algorithm.fedprox.mu=0.01 \
        --config.server_learning_rate=1.0 --workdir=/tmp/run

Parts chosen by name (algorithm, aggregator, compression, trainable) are a
`name` plus one sub-config per choice with that choice's arguments
(`fedjax_ext.training`), so every option is a flag:

    --config.aggregator.name=krum --config.aggregator.krum.num_byzantine=1 \
        --config.aggregator.krum.multi_k=3        # multi-Krum
    --config.aggregator.name=trimmed_mean \
        --config.aggregator.trimmed_mean.trim_fraction=0.2
    --config.compression.name=top_k --config.compression.top_k.fraction=0.05
    --config.compression.name=quantize --config.compression.quantize.bits=8
    --config.trainable.name=last_k --config.trainable.last_k.k=3
    --config.dp.enabled=True --config.dp.noise_multiplier=1.0

With DP on, the aggregator must be 'mean' (DP-FedAvg's clipped, noised mean
replaces it) and batch-norm statistics travel through the same clip and
noise; epsilon is accounted for cohorts drawn without replacement.
"""
import ml_collections

from configs import common
from fedjax_ext import personalization
from fedjax_ext import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name='speech_keywords', num_speakers=200, utterances_per_word=3,
      corpus_seed=0, test_fraction=0.2, split_seed=0, cache_dir='',
      population='espeak'))
  config.partition = ml_collections.ConfigDict(dict(kind='natural'))
  config.model = 'ds_cnn_s'
  config.norm = 'batch'
  config.model_kwargs = ml_collections.ConfigDict({'first_stride': (4, 4)})
  config.quant = 'none'
  # A sparse_updates preset; clients train and send only its leaves.
  config.trainable = training.trainable_options('full')

  # fedjax_ext.algorithms.ALGORITHMS; each has its sub-config of arguments.
  # Adaptive server steps escape the early loss plateau in far fewer rounds
  # than FedAvg at the same client work (benchmarks/results/fed_kws/).
  config.algorithm = training.algorithm_options('fedadam')
  config.server_learning_rate = 0.03
  config.client_learning_rate = 0.05
  config.client_momentum = 0.9
  # Batches of 8 halve the cost of a round of batches of 16 at the same
  # number of sequential local steps, which is what early progress needs.
  config.local = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=16, num_epochs=0,
      # fedjax_ext.client.LocalConfig: how local steps loop and convolve,
      # and how a short last batch is filled ('fill': FedJAX's way).
      loop='auto', conv='auto', last_batch='mask'))
  config.cohort_size = 10
  config.weighted_sampling = False
  config.max_examples_per_client = 128   # Each speaker has 36 x 3 = 108.
  config.num_rounds = 150
  config.dropout_rate = 0.0
  config.execution = 'auto'  # vmap | chunked | streamed | sharded | auto.
  config.host_threads = 1  # >1: cohort parts run at once (execution.py).
  config.aggregator = training.aggregator_options('mean')
  config.compression = training.compression_options('none')
  config.dp = training.dp_options()
  config.secure_aggregation = training.secure_aggregation_options()
  # Held-out users adapt on K examples per class at each evaluation.
  config.personalize = personalization.default_options()
  config.init = ''  # Another run's workdir to start from (ondevice.init_from).
  config.eval_every = 10
  config.eval_batch_size = 512
  config.checkpoint_every = 50
  config.seed = 0

  if args.smoke:
    config.data.num_speakers = 10
    config.data.utterances_per_word = 1
    config.data.test_fraction = 0.2
    config.cohort_size = 4
    config.local.num_steps = 2
    config.local.batch_size = 8
    config.max_examples_per_client = 40
    config.num_rounds = 4
    config.eval_every = 2
    config.checkpoint_every = 2
  return config
