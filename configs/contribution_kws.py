r"""Contribution analysis and budgeted sparse updates for keyword spotting.

Lin et al. (2022), "On-Device Training Under 256KB Memory": pre-train DS-CNN
on the training speakers, fold its batch norms into the convolutions, then
personalise to held-out speakers from a few utterances each: measure the
accuracy gain of updating each layer's biases or weights alone, search the
scheme with the largest summed gain under a 256 KB and a 1 MB training
memory budget (analytic, batch 1, 1-bit ReLU masks), and compare it with
full, bias-only, last-k and classifier-only updates.

The default task is TinyTL-style transfer to new keywords: the ten digits
are held out of pre-training and learnt on the held-out speakers with a
fresh classifier, so the frozen features have something to learn.
`same_words` personalises the pre-trained keywords to held-out speakers
instead (where the pre-trained model is already at its best: see
benchmarks/results/contribution_kws/).

    python -m experiments.contribution_analysis \
        --config=configs/contribution_kws.py --workdir=/tmp/contribution_kws
    python -m experiments.contribution_analysis \
        --config=configs/contribution_kws.py:smoke --workdir=/tmp/run

Arguments: `smoke` (seconds, 8 speakers), `speakers=N` (corpus size),
`same_words` (personalise the pre-trained keywords, no new words).
"""
import ml_collections

from configs import common

SCHEMES = ('full', 'bias_only', 'last_k', 'classifier_only')
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
          'eight', 'nine')


def _data(num_speakers: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='speech_keywords',
      num_speakers=num_speakers,
      utterances_per_word=3,
      corpus_seed=0,
      test_fraction=0.2,         # Held-out speakers: the personalisation set.
      split_seed=0,
      cache_dir='',
      population='espeak',
  ))


def _pretrain() -> ml_collections.ConfigDict:
  """Pre-training on the training speakers (central.supervised fields)."""
  return ml_collections.ConfigDict(dict(
      norm='batch', optimizer='adam', learning_rate=3e-3,
      schedule='warmup_cosine', warmup_steps=100, weight_decay=0.0,
      momentum=0.9, grad_clip=0.0, label_smoothing=0.0, batch_size=64,
      eval_batch_size=512, num_steps=1200, log_every=50, eval_every=300,
      checkpoint_every=600, augment=common.augment()))


def _finetune() -> ml_collections.ConfigDict:
  """Each fine-tune of the contribution analysis and the comparison."""
  return ml_collections.ConfigDict(dict(
      optimizer='momentum', learning_rate=0.02, schedule='constant',
      warmup_steps=0, momentum=0.9, weight_decay=0.0, grad_clip=0.0,
      num_steps=100, batch_size=16, mask_method='magnitude',
      partitioned=True,      # Compile each scheme's own sparse step.
      # The compared schemes each take the rate of best validation accuracy
      # (units are measured at learning_rate, as in Lin et al.).
      lr_grid=(0.002, 0.005, 0.02)))


def _search() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      batch_size=1,                 # On-device training batch.
      relu_mask_bits=1,             # sparse_updates.compact_relu.
      budgets_kb=(256, 1024),
      # Units must gain more than this; None: the standard error of the
      # validation accuracy.
      min_gain=ml_collections.config_dict.placeholder(float)))


def _shrink(config: ml_collections.ConfigDict) -> None:
  """The smoke variant: seconds, 8 speakers."""
  config.data.num_speakers = 8
  config.data.utterances_per_word = 1
  config.data.test_fraction = 0.25
  config.pretrain.num_steps = 20
  config.pretrain.batch_size = 16
  config.pretrain.warmup_steps = 2
  config.pretrain.log_every = 10
  config.pretrain.eval_every = 20
  config.pretrain.checkpoint_every = 20
  config.finetune.num_steps = 3
  config.finetune.batch_size = 8
  config.finetune.partitioned = False  # One compilation for all schemes.
  config.finetune.lr_grid = ()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False, speakers=200, same_words=False)
  config = ml_collections.ConfigDict()
  config.data = _data(args.speakers)
  # Held out of pre-training and learnt with a new classifier; () keeps
  # the pre-trained keywords (personalisation to new speakers only).
  config.transfer_words = () if args.same_words else DIGITS
  config.model = 'ds_cnn_s'
  # As configs/kws_central.py: a 4x4 first stride gives 25 x 10 maps.
  config.model_kwargs = ml_collections.ConfigDict({'first_stride': (4, 4)})
  config.seed = 0
  config.pretrain = _pretrain()
  # Deployed models run with batch norm folded into the convolutions.
  config.fold_batch_norm = True
  # Held-out speakers' utterances: adaptation / validation / rest = test.
  config.adapt_fraction = 0.4
  config.val_fraction = 0.3
  config.split_seed = 0
  config.finetune = _finetune()
  config.unit_weight_fraction = 1.0   # Lin et al. also try 1/8 .. 1/2.
  config.search = _search()
  config.schemes = SCHEMES
  config.last_k = 2
  if args.smoke:
    _shrink(config)
  return config
