"""Compression passes: configs with registered handlers, applied in order by `compress_`."""
from .api import PassConfig, compress_, register_pass
from .prune.configs import (HeadPruneConfig, LayerDropConfig, MagnitudeConfig, MlpPruneConfig, SparseGPTConfig,
                            WandaConfig, WidthPruneConfig)
from .prune import sparsify, structured  # noqa: F401  (registers the pruning handlers)
from .distill import recover  # noqa: F401  (registers KD recovery)
from .distill.trainer import KDConfig
from .quant.awq import AWQConfig
from .quant.gptq import GPTQConfig
from .quant.mixed import MixedPrecisionConfig
from .quant.progressive import ProgressiveConfig
from .quant.rtn import RTNConfig
from .quant.smoothquant import SmoothQuantConfig

__all__ = ["PassConfig", "compress_", "register_pass", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig",
           "HeadPruneConfig", "MlpPruneConfig", "LayerDropConfig", "WidthPruneConfig", "RTNConfig", "GPTQConfig",
           "AWQConfig", "SmoothQuantConfig", "ProgressiveConfig", "MixedPrecisionConfig", "KDConfig", "Recipe", "load_recipe", "apply_recipe"]
from .recipe import Recipe, apply_recipe, load_recipe  # noqa: E402  (after every pass is registered)
