r"""The whole design in one config: federated meta-learning on device budgets.

Per-FedAvg (Fallah et al. 2020) over vmapped speakers, each client's
meta-steps in int8 forward and backward with stochastic rounding, training
and sending only biases (bias-only, TinyTL), DP-FedAvg with its accountant,
secure aggregation of the clipped, noised updates and an int8 uplink. At
every evaluation, held-out speakers adapt the server model on K enrollment
clips per keyword with the same quant mode and trainable scheme, and their
keyword accuracy and detection rate at 5% FAR are logged before and after
(`fedjax_ext.personalization`). The model is a group-norm DS-CNN S, which
meta-learning accepts (no batch statistics to couple a support set).

    python -m experiments.federated --config=configs/fed_personalize_kws.py \
        --workdir=/tmp/fed_personalize
    python -m experiments.federated \
        --config=configs/fed_personalize_kws.py:smoke --workdir=/tmp/run

Bias-only rounds start best from a pre-trained body: train one centrally
(`configs/kws_central.py` with `--config.norm=group`) and pass its work
directory as `--config.init=/tmp/kws_central_gn`. The float32 reference of
the same run is `--config.quant=none --config.trainable.name=full
--config.dp.enabled=False --config.secure_aggregation.enabled=False
--config.compression.name=none`.

Arguments: `smoke` (seconds), `variant=per_fedavg|fed_reptile|fedavg`
(the algorithm).
"""
import ml_collections

from configs import common
from fedjax_ext import personalization
from fedjax_ext import training

KEYWORDS = ('yes', 'no', 'up', 'down', 'left', 'right', 'on', 'off', 'stop',
            'go')


def _personalize(k_shot: int) -> ml_collections.ConfigDict:
  cfg = personalization.default_options()
  cfg.enabled = True
  cfg.k_shot = k_shot
  cfg.keywords = KEYWORDS
  cfg.num_steps = 20
  cfg.learning_rate = 0.05
  return cfg


def _shrink(config: ml_collections.ConfigDict) -> None:
  """Seconds: 10 speakers with 3 clips per word, K = 1, a one-block model."""
  config.model_kwargs.channels = 16
  config.model_kwargs.block_strides = ((1, 1),)
  config.data.num_speakers = 10
  config.data.utterances_per_word = 3
  config.cohort_size = 4
  config.local.num_steps = 1
  config.local.batch_size = 4
  config.max_examples_per_client = 40
  config.num_rounds = 2
  config.eval_every = 2
  config.checkpoint_every = 2
  config.personalize.k_shot = 1
  config.personalize.num_steps = 2
  config.personalize.max_users = 2
  config.personalize.chunk = 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False, variant='per_fedavg')
  config = ml_collections.ConfigDict()
  # Six clips per word: K = 5 to enroll, at least one to evaluate.
  config.data = ml_collections.ConfigDict(dict(
      name='speech_keywords', num_speakers=100, utterances_per_word=6,
      corpus_seed=0, test_fraction=0.2, split_seed=0, cache_dir='',
      population='espeak'))
  config.partition = ml_collections.ConfigDict(dict(kind='natural'))
  config.model = 'ds_cnn_s'
  config.norm = 'group'
  config.model_kwargs = ml_collections.ConfigDict({'first_stride': (4, 4)})
  config.quant = 'int8_fwd_bwd_sr'
  config.trainable = training.trainable_options('bias_only')
  config.algorithm = training.algorithm_options(args.variant)
  config.server_learning_rate = 1.0
  config.client_learning_rate = 0.05
  config.client_momentum = 0.0
  config.local = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=8, num_epochs=0,
      # fedjax_ext.client.LocalConfig: how local steps loop and convolve,
      # and how a short last batch is filled ('fill': FedJAX's way).
      loop='auto', conv='auto', last_batch='mask'))
  config.cohort_size = 10
  config.weighted_sampling = False
  config.max_examples_per_client = 256   # 36 words x 6 clips = 216.
  config.num_rounds = 200
  config.dropout_rate = 0.0
  config.execution = 'auto'
  config.host_threads = 1  # >1: cohort parts run at once (execution.py).
  config.aggregator = training.aggregator_options('mean')
  config.compression = training.compression_options('quantize')
  config.dp = training.dp_options(enabled=True, noise_multiplier=0.5,
                                  clip_norm=0.5, delta=1e-3)
  config.secure_aggregation = training.secure_aggregation_options(
      enabled=True)
  config.personalize = _personalize(k_shot=5)
  config.init = ''
  config.eval_every = 20
  config.eval_batch_size = 512
  config.checkpoint_every = 20
  config.seed = 0
  if args.smoke:
    _shrink(config)
  return config
