r"""FedUV speaker verification vs softmax baselines on synthesised speakers.

Hosseini et al. (ICML 2021), "Federated Learning of User Verification Models
Without Sharing Embeddings". Seen speakers are users (clients); each keeps
train / warm-up / test utterances; unseen speakers are extra impostors.

    nice -n 15 python -m experiments.feduv --config=configs/feduv_kws.py \
        --workdir=/tmp/feduv
    python -m experiments.feduv --config=configs/feduv_kws.py:smoke \
        --workdir=/tmp/feduv_smoke
    python -m experiments.feduv --config=configs/feduv_kws.py \
        --config.variants=feduv,fed_softmax --workdir=/tmp/feduv_nodp
    # DS-CNN S on the log-mel frames (slow on a CPU):
    python -m experiments.feduv \
        --config=configs/feduv_kws.py:backbone=ds_cnn_s --workdir=/tmp/dscnn

Every federated variant runs `config.algorithm` (a name plus one sub-config
of arguments per algorithm, `fedjax_ext.training`), so its options are flags:

    --config.algorithm.name=fedprox --config.algorithm.fedprox.mu=0.01
    --config.algorithm.fedavgm.momentum=0.5
    --config.dp.noise_multiplier=5.0 --config.dp.adaptive=True \
        --config.dp.clipped_count_stddev=3.0
    --config.quant=int8_fwd_bwd_sr --config.feduv_margin=0.5

The *_dp variants turn `config.dp` on (`config.dp.enabled` is set per
variant); epsilon is accounted for cohorts drawn without replacement.

Results of the default config: benchmarks/results/feduv/.
"""
import ml_collections

from configs import common
from fedjax_ext import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False, backbone='mlp')
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name='speech_keywords', num_speakers=200, utterances_per_word=3,
      corpus_seed=0, test_fraction=0.2, split_seed=0, cache_dir='',
      population='espeak'))
  # Of each seen user's utterances: warm-up (thresholds) and test trials.
  config.split = ml_collections.ConfigDict(dict(
      warmup_fraction=0.2, test_fraction=0.2, seed=0))
  _set_backbone(config, args.backbone)
  _set_verification(config)
  _set_federated(config)
  # Central: 15000 steps of 32 (480k examples, a sixth of the federated
  # runs' 3.1M), enough to be the not-private upper bound.
  config.central = ml_collections.ConfigDict(dict(
      optimizer='momentum', learning_rate=0.05, momentum=0.9, num_steps=15000,
      batch_size=32, schedule='constant', warmup_steps=0, weight_decay=0.0,
      grad_clip=0.0, log_every=1, checkpoint_every=5000))
  config.seed = 0
  if args.smoke:
    _shrink(config, args.backbone)
  return config


def _set_backbone(config, backbone: str) -> None:
  """The embedding network and its input features."""
  # Default: an MLP on per-band log-mel mean and std (statistics pooling),
  # sized so the five variants train in minutes on a loaded 2-core CPU;
  # `:backbone=ds_cnn_s` trains DS-CNN S on the log-mel frames instead.
  if backbone == 'mlp':
    config.features = 'log_mel_stats'
    config.model = 'mlp'
    config.norm = 'none'
    config.model_kwargs = ml_collections.ConfigDict({'hidden': (256, 256)})
  elif backbone == 'ds_cnn_s':
    config.features = 'log_mel'
    config.model = 'ds_cnn_s'
    # Group norm: batch norm over one speaker's batch would subtract the
    # speaker statistics that verification needs.
    config.norm = 'group'
    config.model_kwargs = ml_collections.ConfigDict(
        {'first_stride': (4, 4), 'channels': 32})
  else:
    raise ValueError(f"backbone={backbone!r}: choose 'mlp' or 'ds_cnn_s'.")
  config.quant = 'none'          # quantized_training.QUANT_NAMES


def _set_verification(config) -> None:
  """Codes, loss, variants and how they are scored."""
  # BCH(63, 16), t = 11: d_min >= 23; 8 id bits + 8 private bits.
  config.code = ml_collections.ConfigDict(dict(m=6, t=11, min_random_bits=4))
  config.embedding_dim = 63      # softmax baselines (FedUV uses n).
  config.logit_scale = 16.0
  # The paper's hinge has margin 1: with a unit-norm f that asks for
  # cos(f, v_u) = 1, an exact codeword, and never stops pulling. A margin
  # of 0.3 stops once an utterance is well inside its user's cone
  # (sweep of 0.1-1.0 in benchmarks/results/feduv/README.md).
  config.feduv_margin = 0.3
  # Each FedUV model is scored against every reference listed: 'codeword'
  # (the paper: the user's secret codeword; row feduv) and 'mean' (the mean
  # embedding of the user's own training utterances, computed on the
  # device like the softmax baselines' enrollment; row feduv_mean_ref).
  config.feduv_references = ('codeword', 'mean')
  config.variants = 'central_softmax,fed_softmax,feduv,fed_softmax_dp,feduv_dp'
  config.target_tpr = 0.9
  config.fars = (0.01, 0.1)
  config.eval_batch_size = 512   # Utterances embedded per call when scoring.


def _set_federated(config) -> None:
  """Rounds of every federated variant (`fedjax_ext.training` reads them)."""
  # Server momentum (FedAvgM) for every federated variant: it lowered
  # FedUV's EER at 300 rounds in a small sweep (benchmarks/results/feduv).
  config.algorithm = training.algorithm_options(
      'fedavgm', fedavgm={'momentum': 0.9})
  config.server_learning_rate = 1.0
  config.client_learning_rate = 0.2
  config.client_momentum = 0.0
  # loop: 'scan', 'unroll' or 'auto' (fedjax_ext.client.LOOPS).
  config.local = ml_collections.ConfigDict(dict(
      batch_size=16, num_steps=4, num_epochs=0, loop='auto'))
  config.cohort_size = 16
  config.max_examples_per_client = 72
  config.num_rounds = 3000
  config.dropout_rate = 0.0
  config.execution = 'auto'
  config.aggregator = training.aggregator_options('mean')
  config.compression = training.compression_options('none')
  # z = 3.5 with cohorts of 16 of 160 users over 3000 rounds: epsilon 18.0
  # at delta 1e-4 for fixed-size cohorts drawn without replacement (RDP,
  # replace-one neighbours).
  config.dp = training.dp_options(noise_multiplier=3.5, clip_norm=0.5,
                                  delta=1e-4)
  # Read by fedjax_ext.training's checks; FedUV scores each model once,
  # after its last round.
  config.eval_every = 100
  # Every round's training loss is logged (results' train_loss_curve);
  # checkpoints go to <workdir>/variants/<name>/.
  config.log_every = 1
  config.checkpoint_every = 1000


def _shrink(config, backbone: str) -> None:
  """The smoke variant: ten speakers, a few rounds and steps."""
  config.data.num_speakers = 10
  config.data.utterances_per_word = 1
  config.code = ml_collections.ConfigDict(dict(m=4, t=2, min_random_bits=2))
  config.embedding_dim = 15
  if backbone == 'ds_cnn_s':
    config.model_kwargs.channels = 16
    # A DS-CNN compiles slowly on a CPU: FedUV alone (the MLP smoke run
    # covers the other trainers and the DP rounds).
    config.variants = 'feduv'
  config.cohort_size = 4
  config.local.num_steps = 2
  config.local.batch_size = 8
  config.max_examples_per_client = 24
  config.num_rounds = 3
  config.eval_every = 1
  config.central.num_steps = 3
  config.central.batch_size = 8
