r"""Centralised keyword spotting on the synthesised speech corpus.

DS-CNN (Zhang et al. 2017, "Hello Edge") on 40-band log-mel features of the
offline espeak-ng corpus; the test split holds speakers never seen in training.

    python -m experiments.train --config=configs/kws_central.py \
        --workdir=/tmp/kws_central
    python -m experiments.train --config=configs/kws_central.py:smoke \
        --config.num_steps=200 --workdir=/tmp/run

Every part is chosen by name and settable from the command line, e.g.
    --config.quant=int8_fwd_bwd_sr            (quantized_training.QUANT_NAMES)
    --config.trainable.name=last_k --config.trainable.last_k.k=3
    --config.optimizer_state.name=int8        (int8 Adam moments)
    --config.qas.name=qas                     (train int8 weights with QAS)
    --config.data.name=tfds_speech_commands   (needs network and TensorFlow)
"""
import ml_collections

from configs import common
from ondevice import options
from quantized_training import optimizers
from sparse_updates import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name='speech_keywords',
      num_speakers=200,          # >= 200 speakers, one client each.
      utterances_per_word=3,
      corpus_seed=0,
      test_fraction=0.2,         # Fraction of *speakers* held out.
      split_seed=0,
      cache_dir='',              # '' = $ONDEVICE_CACHE or ~/.cache/ondevice.
      population='espeak',       # See ondevice.data.population.NAMES.
  ))
  config.model = 'ds_cnn_s'
  config.norm = 'batch'
  # A 4x4 first stride maps the 98x40 log-mel to 25x10, the resolution the
  # paper's DS-CNN sees (25x5 from 49x10 MFCC) and 4x cheaper than 2x2.
  config.model_kwargs = ml_collections.ConfigDict({'first_stride': (4, 4)})
  config.quant = 'none'          # See quantized_training.QUANT_NAMES.
  config.trainable = options.named(presets.PRESET_BUILDERS, 'full')
  config.optimizer = 'adam'
  # Optimiser moments as int8 codes, and QAS training of integer weights
  # (Lin et al. 2022): quantized_training.optimizers.
  config.optimizer_state = options.named(optimizers.STATE_FORMATS, 'float')
  config.qas = options.named(optimizers.QAS_MODES, 'none')
  config.learning_rate = 3e-3
  config.schedule = 'warmup_cosine'
  config.warmup_steps = 100
  config.weight_decay = 0.0
  config.momentum = 0.9
  config.grad_clip = 0.0
  config.label_smoothing = 0.0
  # SpecAugment views of each batch, e.g. --config.augment.time_mask=12
  # (configs/common.augment; all zeros: off).
  config.augment = common.augment()
  config.batch_size = 64
  config.eval_batch_size = 512
  config.num_steps = 1200
  config.log_every = 50
  config.eval_every = 300
  config.checkpoint_every = 600
  config.seed = 0

  if args.smoke:
    config.data.num_speakers = 8
    config.data.utterances_per_word = 1
    config.data.test_fraction = 0.25
    config.num_steps = 20
    config.batch_size = 16
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
    config.warmup_steps = 2
  return config
