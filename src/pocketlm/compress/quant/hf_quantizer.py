"""transformers integration: after `import pocketlm`, `AutoModelForCausalLM.from_pretrained(artifact)` loads
a pocketlm quantized artifact (config.json `quantization_config.quant_method == "pocketlm"`).

transformers builds the float model on the meta device, calls the quantizer, fills every parameter and
buffer whose name matches a checkpoint key, then ties weights. The quantizer: before loading,
`artifact.install_shells` swaps the named modules for empty quantized shells (so `qweight`, `scales`,
`zeros` are the expected keys) and the lm_head.weight → embed_tokens.weight tie is dropped (a tied pair
shares the head's int8 table through QuantEmbedding instead); after loading, the buffers get their own
memory and `artifact.finish` converts them to the kernels' layout. `pocketlm.load` uses the same two
functions, so both loaders build the same modules and give the same logits.

Importing transformers' quantizer registry costs seconds, so `import pocketlm` only installs an import
hook (`register_on_import`): the config and quantizer are defined and registered when transformers
loads `transformers.quantizers.auto`, which it does before it reads any quantization_config.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

from .artifact import QUANT_METHOD

_REGISTRY = "transformers.quantizers.auto"
PocketlmQuantConfig = PocketlmHfQuantizer = None  # the classes, defined by register() (names declared global)


def register() -> None:
    """Define and register `PocketlmQuantConfig` and `PocketlmHfQuantizer` with transformers (idempotent)."""
    global PocketlmQuantConfig, PocketlmHfQuantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(QUANT_METHOD)
    class PocketlmQuantConfig(QuantizationConfigMixin):
        """config.json's `quantization_config` as `artifact.describe` writes it: the quantized modules by name."""

        def __init__(self, modules: dict | None = None, quant_method: str = QUANT_METHOD, **kwargs):
            self.quant_method = quant_method
            self.modules = dict(modules or {})

        def to_dict(self) -> dict:
            return {"quant_method": self.quant_method, "modules": self.modules}

    @register_quantizer(QUANT_METHOD)
    class PocketlmHfQuantizer(HfQuantizer):
        """Loads pre-quantized pocketlm artifacts; quantizing a float checkpoint is `pocketlm compress`'s job
        (requires_calibration makes transformers refuse a config passed for a float model)."""

        requires_calibration = True
        quantization_config: PocketlmQuantConfig

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .artifact import install_shells
            install_shells(model, self.quantization_config.to_dict(), model.dtype)  # built in the load dtype
            # the shells have no `weight` to tie: a tied embedding reads the head's table instead
            quantized = set(self.quantization_config.modules)
            model.all_tied_weights_keys = {k: v for k, v in getattr(model, "all_tied_weights_keys", {}).items()
                                           if k.rpartition(".")[0] not in quantized
                                           and v.rpartition(".")[0] not in quantized}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .artifact import finish
            _own_buffers(model)
            finish(model)
            return model

        def is_serializable(self) -> bool:
            return True  # the modules save their portable layout; config.json keeps this config

        @property
        def is_trainable(self) -> bool:
            return False


def _own_buffers(model) -> None:
    """Copy the quantized modules' buffers into memory of their own. transformers hands over views of the
    memory-mapped checkpoint at the file's offsets, which the int8 kernel's aligned loads fault on
    (a segfault on an 8-byte-aligned lm_head.qweight); a fresh tensor is 64-byte aligned."""
    from .linear import QuantLinear, W8A8Linear
    for m in model.modules():
        if isinstance(m, (QuantLinear, W8A8Linear)):
            for name, buf in m._buffers.items():
                if buf is not None:
                    m._buffers[name] = buf.clone()


class _RegisterAfter(importlib.abc.Loader):
    """Runs the real loader of transformers' quantizer registry, then `register()`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        try:
            register()
        except Exception as e:  # a transformers API change must not break importing transformers
            warnings.warn(f"pocketlm could not register its transformers quantizer ({e}); "
                          "load quantized artifacts with pocketlm.load", stacklevel=2)

    def __getattr__(self, name):  # get_source, get_filename, ... as the real loader has them
        return getattr(self.loader, name)


class _RegistryHook(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry through the other finders and wraps its loader (once)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


def register_on_import() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it loads."""
    if _REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())


register_on_import()
