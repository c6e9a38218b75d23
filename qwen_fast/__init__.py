"""qwen_fast: a fast, exact inference engine for Qwen-1.8B-Chat (Qwen v1).

    from qwen_fast import Engine
    engine = Engine.from_pretrained("path/to/Qwen-1_8B-Chat")
    response, history = engine.chat("你好")

Importing the package is light: torch and the extension load when first used.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Engine": ("engine", "Engine"),
    "GenerationResult": ("engine", "GenerationResult"),
    "SamplingParams": ("sampling", "SamplingParams"),
    "GenerationConfig": ("config", "GenerationConfig"),
    "QwenConfig": ("config", "QwenConfig"),
    "QwenTokenizer": ("tokenizer", "QwenTokenizer"),
    "QwenFastError": ("errors", "QwenFastError"),
    "ConfigError": ("errors", "ConfigError"),
    "CheckpointError": ("errors", "CheckpointError"),
    "RequestError": ("errors", "RequestError"),
    "CapacityError": ("errors", "CapacityError"),
    "NumericalError": ("errors", "NumericalError"),
    "OverloadedError": ("errors", "OverloadedError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module 'qwen_fast' has no attribute {name!r}")
