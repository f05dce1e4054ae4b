"""opt-queue: push JSONL datasets of prompts through OpenAI-compatible chat APIs in parallel,
across many keys and machines, within every key's limits, without losing a row.

The original toolkit's API (``from opt_queue import ParallelToolkit, Prompt, OpenAIModel``) is
loaded on first use, so that importing a part of the package (the engine, the simulated API)
does not build the Celery app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["OpenAIModel", "ParallelToolkit", "Prompt", "__version__"]

if TYPE_CHECKING:
    from opt_queue.compat import OpenAIModel, ParallelToolkit, Prompt


def __getattr__(name: str) -> Any:
    if name in ("OpenAIModel", "ParallelToolkit", "Prompt"):
        from opt_queue import compat

        return getattr(compat, name)
    raise AttributeError(f"module 'opt_queue' has no attribute {name!r}")
