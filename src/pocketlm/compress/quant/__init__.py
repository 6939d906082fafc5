"""Weight quantization: RTN, GPTQ, AWQ, progressive and mixed precision (weight-only int8/int4/int3) and
SmoothQuant W8A8, with torch's packed CPU kernels and artifacts that transformers can load."""
from . import hf_quantizer  # noqa: F401  (lets transformers load pocketlm artifacts; registers lazily)
