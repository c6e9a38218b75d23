"""The package's error types: one base class and a small hierarchy by what was wrong.

    QwenFastError                    every error qwen_fast raises on purpose
    ├── ConfigError (ValueError)     config.json / generation_config.json / a QwenConfig value
    ├── CheckpointError (ValueError) weight files, the index, the vocabulary file
    ├── RequestError (ValueError)    a bad argument to generate / stream / chat / logits:
    │   │                            prompt, sampling parameter, history, messages
    │   └── CapacityError            a request that cannot fit: longer than the context, or
    │                                more memory than the engine's budget
    ├── NumericalError (RuntimeError) the model itself produced NaN/Inf logits (broken weights
    │                                or an fp16 overflow), whatever the request
    └── OverloadedError (RuntimeError) the engine's waiting queue is full (a submission's
                                     max_waiting): nothing was queued, retry later

Every message names the file, tensor, field or parameter that was wrong and what was expected.
All but NumericalError and OverloadedError are ValueError subclasses because the caller passed a bad value; ``except QwenFastError``
catches all of them and nothing else.
"""
from __future__ import annotations

__all__ = ["QwenFastError", "ConfigError", "CheckpointError", "RequestError", "CapacityError",
           "NumericalError", "OverloadedError"]


class QwenFastError(Exception):
    """Base class of every error qwen_fast raises on purpose."""


class ConfigError(QwenFastError, ValueError):
    """A config.json / generation_config.json (or a QwenConfig) that does not describe a
    Qwen v1 model this engine can run."""


class CheckpointError(QwenFastError, ValueError):
    """A checkpoint directory, weight file, index or vocabulary file that does not match the
    Qwen v1 release layout, or holds unusable values (NaN/Inf weights)."""


class RequestError(QwenFastError, ValueError):
    """A bad argument to a generation call: the prompt, a sampling parameter, the history or
    the messages. Nothing has been computed when it is raised. ``param`` names the argument
    (a SamplingParams field, "prompt", "messages", ...) when one is to blame, else None."""

    def __init__(self, message: str = "", param: "str | None" = None):
        super().__init__(message)
        self.param = param

    @classmethod
    def of(cls, param: str, message: str) -> "RequestError":
        return cls(message, param=param)


class CapacityError(RequestError):
    """A request that cannot fit: prompt + max_new_tokens beyond the model's context, or a
    KV cache larger than the engine's memory budget. Raised before any work is done."""


class NumericalError(QwenFastError, RuntimeError):
    """The model produced NaN or Inf logits: broken weights (load with check_finite=True) or
    an overflow of the compute dtype; no sampling parameter causes it."""


class OverloadedError(QwenFastError, RuntimeError):
    """More requests would wait for a batch row than the submission allowed (max_waiting).
    Nothing was queued or computed; the same call may succeed later."""
