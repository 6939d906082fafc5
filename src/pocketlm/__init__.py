"""pocketlm: make Hugging Face causal LMs small and fast for edge and on-prem machines, measure, run."""
__version__ = "0.1.0"

from .errors import PocketError  # noqa: E402
from .io import load, save  # noqa: E402
from .eval.protocol import EvalProtocol, EvalReport, evaluate  # noqa: E402
from .compress import compress_  # noqa: E402

__all__ = ["__version__", "PocketError", "load", "save", "EvalProtocol", "EvalReport", "evaluate", "compress_"]
