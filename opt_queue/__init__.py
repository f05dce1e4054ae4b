"""opt-queue: push JSONL datasets of prompts through OpenAI-compatible chat APIs in parallel,
across many keys and machines, within every key's limits, without losing a row."""

from __future__ import annotations

__version__ = "0.1.0"

from opt_queue.compat import OpenAIModel, ParallelToolkit, Prompt

__all__ = ["OpenAIModel", "ParallelToolkit", "Prompt", "__version__"]
