"""OpenAI-compatible serving: `create_app(ServeConfig(...))` for uvicorn; `pocketlm serve` runs it."""
from .app import create_app
from .engine import ServeConfig

__all__ = ["create_app", "ServeConfig"]
