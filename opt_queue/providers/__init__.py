"""The APIs opt-queue calls, behind one seam (:class:`Provider`, in ``base.py``).

``openai.py`` speaks OpenAI's API (Azure OpenAI included) through the official ``openai`` SDK, or
over aiohttp directly with ``api_client: "aiohttp"``. :func:`for_config` gives the engine the
provider of a config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opt_queue.providers.base import (FINAL_KINDS, Answer, Batch, BatchProvider, CallFailed, Failure, Kind, Provider,
                                      redact)

if TYPE_CHECKING:
    from opt_queue.core.config import Config

__all__ = ["FINAL_KINDS", "Answer", "Batch", "BatchProvider", "CallFailed", "Failure", "Kind", "Provider", "for_config",
           "redact"]


def for_config(config: Config) -> Provider:
    """The provider the config's keys speak (``api_client`` says how to reach OpenAI's API)."""
    from opt_queue.providers.openai import OpenAIProvider  # the SDK is imported only to call

    return OpenAIProvider(config.api_client)
