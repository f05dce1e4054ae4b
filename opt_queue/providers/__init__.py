"""The APIs opt-queue calls, behind one seam (:class:`Provider`, in ``base.py``).

``openai.py`` speaks OpenAI's API (Azure OpenAI included) through the official ``openai`` SDK, or
over aiohttp directly with ``api_client: "aiohttp"``; ``anthropic.py`` Anthropic's Messages API
through the ``anthropic`` SDK (the ``opt-queue[anthropic]`` extra); ``gemini.py`` the Gemini API's
``generateContent`` through the ``google-genai`` SDK (``opt-queue[gemini]``). :func:`for_config` gives the
engine one provider for all of a config's keys (:class:`Providers`): each call goes to the
provider its key speaks, on one connection pool.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from opt_queue.core.errors import ConfigError
from opt_queue.providers.base import (FINAL_KINDS, REQUIRED_MAX_TOKENS, Answer, Batch, BatchEntry, BatchProvider, CallFailed,
                                      Failure, Kind, Provider, classify_other, redact)
from opt_queue.providers.http import Http

if TYPE_CHECKING:
    from opt_queue.core.config import ApiKey, Config

__all__ = ["BATCH_LIMITS", "EXTRAS", "FINAL_KINDS", "REQUIRED_MAX_TOKENS", "WINDOW_COUNTS_OUTPUT", "Answer", "Batch",
           "BatchEntry", "BatchProvider", "serving",
           "CallFailed", "Failure", "Kind", "Provider", "Providers", "check_installed", "for_config", "redact",
           "window_counts_output", "with_required_cap"]

EXTRAS = {"anthropic": ("anthropic", "anthropic"), "gemini": ("google.genai", "gemini")}
"""Per provider beyond OpenAI: the SDK module it needs and the extra that installs it."""
WINDOW_COUNTS_OUTPUT = {"openai": True, "anthropic": False, "gemini": False}
"""Whether a provider's tokens-per-minute window counts a request's output (OpenAI counts the
prompt and ``max_tokens`` on arrival; Anthropic's input-token and Gemini's token windows count input)."""
CAPS = ("max_completion_tokens", "max_tokens")
BATCH_LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024),
                "gemini": (50_000, 18 * 1024 * 1024)}
"""Per provider, the most requests and bytes one batch may hold: OpenAI's Batch API 50,000 lines and
200 MB (its batch guide), Anthropic's Message Batches 100,000 requests and 256 MB (its batch
processing guide), Gemini's inline Batch Mode requests 20 MB in all (its Batch Mode guide; 18 MB of
rows leaves room for the native request's own shape; it states no count, so OpenAI's)."""


def serving(keys: Iterable[ApiKey], model: str) -> frozenset[str]:
    """The providers of the keys that serve ``model``."""
    return frozenset(k.provider for k in keys if k.serves(model))


def window_counts_output(serving: frozenset[str]) -> bool:
    """Whether the token windows of keys of these providers count a request's output; the safe side
    when keys of several kinds serve a model (none: OpenAI's way)."""
    return not serving or any(WINDOW_COUNTS_OUTPUT.get(p, True) for p in serving)


def with_required_cap(serving: frozenset[str], body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the ``max_tokens`` its provider requires when it sets none (every serving
    provider requires one: the request is the same whichever key takes it)."""
    if not serving or any(c in body for c in CAPS):
        return body
    caps = {REQUIRED_MAX_TOKENS.get(p) for p in serving}
    if len(caps) == 1 and None not in caps:
        body["max_tokens"] = caps.pop()
    return body


def check_installed(config: Config) -> None:
    """Refuse, before anything is paid, keys of a provider whose SDK is not installed."""
    for i, entry in enumerate(config._entries()):
        needs = EXTRAS.get(entry.provider)
        if needs is None:
            continue
        try:
            importlib.import_module(needs[0])
        except ImportError:
            raise ConfigError(f"api_keys[{i}]: provider {entry.provider!r} needs its SDK; install it with "
                              f"pip install 'opt-queue[{needs[1]}]' (or 'opt-queue[all]')") from None


def _make(name: str, api_client: str, http: Http) -> Any:
    if name == "anthropic":
        from opt_queue.providers.anthropic import AnthropicProvider

        return AnthropicProvider(http)
    if name == "gemini":
        from opt_queue.providers.gemini import GeminiProvider

        return GeminiProvider(http)
    from opt_queue.providers.openai import OpenAIProvider  # the SDK is imported only to call

    return OpenAIProvider(api_client, http)


class Providers:
    """Every provider a config's keys speak, as one :class:`Provider`: a call goes to the provider
    of its key, and what it raised leaves classified (:class:`CallFailed`), so that
    :meth:`classify` needs no knowledge of which SDK raised it."""

    def __init__(self, api_client: str = "openai") -> None:
        self.api_client = api_client
        self.http = Http()
        self._by_name: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Providers {sorted(self._by_name)}>"

    def of(self, key: ApiKey) -> Any:
        """The provider ``key`` speaks (made on first use)."""
        found = self._by_name.get(key.provider)
        if found is None:
            found = self._by_name[key.provider] = _make(key.provider, self.api_client, self.http)
        return found

    def warm_up(self) -> None:
        self.http.session()

    async def call(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                   on_send: Callable[[], None] | None = None) -> Answer:
        provider = self.of(key)
        try:
            return await provider.call(key, url, body, timeout, on_send)
        except Exception as exc:
            raise CallFailed(provider.classify(exc), getattr(exc, "usage", None)) from exc

    def classify(self, exc: BaseException) -> Failure:
        return classify_other(exc)

    async def close(self) -> None:
        for provider in self._by_name.values():
            await provider.close()
        self._by_name.clear()
        await self.http.close()

    # -- the batch lane's operations go to the key's provider ----------------------------------
    def files(self, key: ApiKey) -> bool:
        """Whether ``key``'s batches read their requests from an uploaded file (``BatchProvider.files``)."""
        return bool(self.of(key).files)

    def names_batches(self, key: ApiKey) -> bool:
        """Whether ``key``'s batches keep the metadata they were created with."""
        return bool(self.of(key).names_batches)

    async def _run(self, key: ApiKey, op: str, *args: Any, **kwargs: Any) -> Any:
        provider = self.of(key)
        try:
            return await getattr(provider, op)(key, *args, **kwargs)
        except Exception as exc:
            raise CallFailed(provider.classify(exc)) from exc

    async def upload(self, key: ApiKey, name: str, data: bytes, timeout: float) -> str:
        return await self._run(key, "upload", name, data, timeout)

    async def create_batch(self, key: ApiKey, endpoint: str, model: str, metadata: dict[str, str], timeout: float,
                           file_id: str | None = None,
                           requests: list[tuple[str, dict[str, Any]]] | None = None) -> Batch:
        return await self._run(key, "create_batch", endpoint, model, metadata, timeout, file_id=file_id,
                               requests=requests)

    async def batch(self, key: ApiKey, batch_id: str, timeout: float) -> Batch:
        return await self._run(key, "batch", batch_id, timeout)

    async def cancel_batch(self, key: ApiKey, batch_id: str, timeout: float) -> None:
        await self._run(key, "cancel_batch", batch_id, timeout)

    async def _each(self, key: ApiKey, op: str, *args: Any) -> AsyncIterator[Any]:
        """What :meth:`_run` is for a call that streams: each item, a failure classified."""
        provider = self.of(key)
        try:
            async for found in getattr(provider, op)(key, *args):
                yield found
        except Exception as exc:
            raise CallFailed(provider.classify(exc)) from exc

    def recent_batches(self, key: ApiKey, timeout: float) -> AsyncIterator[Batch]:
        return self._each(key, "recent_batches", timeout)

    def results(self, key: ApiKey, batch: Batch, timeout: float) -> AsyncIterator[BatchEntry]:
        """A batch's results, streamed (``BatchProvider.results``)."""
        return self._each(key, "results", batch, timeout)

    def classify_response(self, key: ApiKey | None, status: int, body: Any) -> Failure:
        """What an error inside a batch's results of ``key`` means (OpenAI's shape when the key is
        no longer configured)."""
        if key is None:
            from opt_queue.providers.openai import classify_status

            return classify_status(status, body, {}, "")
        return self.of(key).classify_response(status, body)


def for_config(config: Config) -> Providers:
    """The provider of a config's keys (``api_client`` says how to reach OpenAI's API)."""
    check_installed(config)
    return Providers(config.api_client)
