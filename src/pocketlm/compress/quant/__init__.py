"""Weight quantization: round-to-nearest int8/int4 with packed CPU kernels (GPTQ, AWQ, SmoothQuant,
mixed precision and quantized artifacts come with the quantization issue)."""
