"""fp32 linears on CPU for the engine: plain (out, in) weights, faster than torch's default at decode.

torch's fp32 matmul goes to MKL's sgemm, slow at the few rows of a decode step. On `small` (2 threads,
AMD EPYC, AVX-512) one step's 33 matrix products took, at 1 / 8 rows: MKL 3.0 / 6.0 ms, oneDNN's
linear on the same plain weights 1.7 / 3.1 ms, and `cpu_linear.cpp` (weight rows streamed once,
shared by all input rows, prefetched) 1.1–1.2 / 1.5 ms. The model's weights stay as they are: no copy.

Eager code calls oneDNN's `mkldnn._linear_pointwise` directly, so it needs no compiler; below
`ONEDNN_MIN_WEIGHTS` it calls F.linear instead, since oneDNN's call costs ~20 µs more there (a 256×256
weight: 28 vs 9 µs at 1 row, 52 vs 25 µs at 8; they break even near 256K weights). Compiled
steps call `pocketlm_cpu::linear` (the .cpp beside this file, built on first use with the flags of this
CPU, about 7 s, then loaded from disk): inductor lowers the mkldnn op only for weights it froze into
constants, and a Python custom op would cost ~40 µs per call from inductor's C++ wrapper.

int8 and int4 weight-only layers (`qlinear8`, `qlinear4`: cpu_qlinear.cpp, the same build) take
fp32 activations, eager and compiled: torch's kernels round them to bf16, which cost SmolLM2-135M
+0.18% perplexity of its +0.59% at int8. A machine where the build fails keeps torch's kernels
(with one warning).
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from ..errors import ConfigError

_SOURCES = [Path(__file__).with_name(n) for n in ("cpu_linear.cpp", "cpu_qlinear.cpp", "cpu_step.cpp")]
_HEADER = Path(__file__).with_name("cpu_kernels.h")
_built = False
_unbuildable: str | None = None  # why the build failed, once it has
ONEDNN_MIN_WEIGHTS = 1 << 18  # eager: smaller weights go to F.linear (MKL)


def available(weight: torch.Tensor) -> bool:
    """These kernels serve this weight: fp32 on a CPU build of torch with oneDNN (mkldnn)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias); weight (out, in) contiguous."""
    if torch.compiler.is_compiling():
        return torch.ops.pocketlm_cpu.linear(x, weight, bias)
    if weight.numel() < ONEDNN_MIN_WEIGHTS:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def qlinear8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """fp32 x (.., K) @ (int8 codes q (N, K) · bf16 scales (N, G) per group)ᵀ; None where the kernel
    cannot be built (the caller then takes torch's bf16 kernel)."""
    if not torch.compiler.is_compiling() and not kernels_built():
        return None
    return torch.ops.pocketlm_cpu.qlinear8(x, q, scales)


def kernels_built() -> bool:
    """pocketlm's CPU kernels are loaded (built now if need be); False where they cannot be built."""
    global _unbuildable
    if _built:
        return True
    if _unbuildable is None:
        try:
            build_kernel()
        except ConfigError as e:
            _unbuildable = str(e)
            import warnings
            warnings.warn(f"{e}; int8/int4 layers use torch's kernels (bf16 activations)", stacklevel=3)
    return _built


def act8_kernel() -> str | None:
    """The integer dot products of 8-bit activations in this CPU's build ("AVX-512 VNNI", "AVX2"), or None."""
    if not kernels_built():
        return None
    return {2: "AVX-512 VNNI", 1: "AVX2"}.get(torch.ops.pocketlm_cpu.act8_kernel())


def build_kernel() -> None:
    """Build (first time on this CPU) and load `pocketlm_cpu::linear`, `::qlinear8` and `::qlinear4`, once per process."""
    global _built
    if _built:
        return
    from torch.utils.cpp_extension import load
    # -march=native: the build is for this CPU; its directory is keyed by the CPU and the sources.
    key = hashlib.sha256(b"".join(s.read_bytes() for s in [*_SOURCES, _HEADER]) + _cpu_id().encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    build = Path.home() / ".cache" / "pocketlm" / f"cpu_linear-{key}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        load("pocketlm_cpu", [str(s) for s in _SOURCES], extra_cflags=["-O3", "-march=native", "-fopenmp"],
             extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"building the CPU linear kernel failed ({first})",
                          "install g++ and ninja (pip install ninja), or run eagerly (--eager, compile=False)") from e
    torch.library.register_fake("pocketlm_cpu::linear", _shape)
    torch.library.register_fake("pocketlm_cpu::qlinear8", _shape)
    torch.library.register_fake("pocketlm_cpu::qlinear4", _shape4)
    _built = True


def _shape(x: torch.Tensor, w: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _shape4(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])


def _cpu_id() -> str:
    """The CPU model and its feature flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(dict.fromkeys(ln for ln in info if ln.startswith(("model name", "flags", "Features"))))
    except OSError:
        return platform.processor() or platform.machine()
