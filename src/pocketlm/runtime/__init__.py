"""Runtime: the fast generation engine (static KV cache, compiled decode step, streaming, batching)."""
from .generate import GenerationResponse, Generator
from .sampling import SamplingConfig

__all__ = ["Generator", "GenerationResponse", "SamplingConfig"]
