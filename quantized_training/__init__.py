"""int8 fake-quantised training: forward and backward matmuls in int8.

Public API:
  * ``get_quant(name) -> QuantSpec`` and ``QUANT_NAMES``: modes by name.
  * ``Int8Config`` / ``FwdConfig`` / ``BwdConfig``: per-matmul configuration.
  * ``int8_dot_general``, ``int8_conv_general_dilated``: functional drop-ins.
  * ``Int8DotGeneral``, ``Int8ConvGeneralDilated``: flax ``*_cls`` modules.
  * ``Quantizer``, ``fake_quant``: standalone quantisers with an STE.
  * ``quantization_aware_scaling``: QAS (Lin et al. 2022) as optax.
  * ``int8_state``: an optax wrapper keeping optimiser state in int8.
"""

from quantized_training.config import BwdConfig
from quantized_training.config import FwdConfig
from quantized_training.config import Int8Config
from quantized_training.config import uniform
from quantized_training.int8_conv import int8_conv_general_dilated
from quantized_training.int8_dot import int8_dot_general
from quantized_training.optim_state import int8_state
from quantized_training.layers import Int8ConvGeneralDilated
from quantized_training.layers import Int8DotGeneral
from quantized_training.qas import float_domain
from quantized_training.qas import integer_domain
from quantized_training.qas import kernel_scales
from quantized_training.qas import quantization_aware_scaling
from quantized_training.quantizers import fake_quant
from quantized_training.quantizers import Quantizer
from quantized_training.registry import get_quant
from quantized_training.registry import QUANT_NAMES
from quantized_training.registry import QuantSpec
from quantized_training.registry import spec_from_config
