"""The batch lane's submit side: a job's rows grouped into *chunks*, Batch API input files within
the provider's limits, stored in Redis with the job; each chunk's state; the deadline's cut-over.
The worker side, which sends the chunks and reads their batches back, is ``batchlane``. Nothing
here calls the API (``submit``, ``status`` and ``cancel`` import it without the SDK)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from opt_queue.store import keys as rkeys
from opt_queue.core.config import Config
from opt_queue.providers import BATCH_LIMITS, serving
from opt_queue.core.tokens import estimate_parts


@dataclass
class Chunk:
    """The state of one chunk, kept as JSON in the job's ``batches`` hash."""

    url: str
    model: str
    rows: int
    tokens: int
    options: dict[str, Any] = field(default_factory=dict)
    state: str = "pending"
    attempt: int = 0
    failures: int = 0
    key: str | None = None
    tag: str | None = None
    file_id: str | None = None
    file_key: str | None = None
    """The key that uploaded ``file_id`` (a file belongs to its key's organization)."""
    batch_id: str | None = None
    sent_at: float = 0.0
    """When this attempt's create call was made (a lost batch of a provider that keeps no metadata
    is found by it)."""
    status: str | None = None
    answered: int = 0
    nulls: int = 0
    moved: int = 0
    cancel_asked: bool = False
    """The provider was asked to cancel the batch (once: Gemini's batches show no cancelling state)."""
    handed: bool = False
    """Its rows went to the synchronous lane while the provider was still cancelling its batch."""
    polls: int = 0
    reserved_nano: int = 0
    reserved_tokens: int = 0
    """The job budget's share this chunk's batch holds while it runs (its worst case)."""

    def next_poll(self, most: float) -> float:
        """Seconds to the next look at the batch: 1 s, growing by half each time, up to ``most``."""
        self.polls += 1
        return min(most, 1.5 ** (self.polls - 1))

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> Chunk:
        return cls(**json.loads(raw))


def file_line(index: str, url: str, body: dict[str, Any]) -> str:
    """One request as a line of a Batch API input file."""
    return json.dumps({"custom_id": index, "method": "POST", "url": url, "body": body}, ensure_ascii=False)


class ChunkLines(Mapping[str, dict[str, Any]]):
    """A chunk's file as its requests by index, each parsed when it is asked for: the file's bytes
    and where each line lies are kept, not every line parsed (a 50,000-row file parsed whole
    costs hundreds of MB)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at: dict[str, tuple[int, int]] = {}
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\n", start)
            end = size if end < 0 else end
            if data[start:end].strip():
                self._at[str(json.loads(data[start:end])["custom_id"])] = (start, end)
            start = end + 1

    def __getitem__(self, index: str) -> dict[str, Any]:
        return json.loads(self.raw(index))  # type: ignore[no-any-return]

    def raw(self, index: str) -> str:
        """The row's line as the file holds it."""
        start, end = self._at[index]
        return self._data[start:end].decode()

    def __contains__(self, index: object) -> bool:
        return index in self._at

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


def store_chunk(pipe: Any, job_id: str, chunk_id: str, chunk: Chunk, lines: list[str], indices: list[str]) -> None:
    """Queue on ``pipe`` (a transaction) a new chunk: its file, its state, its rows, its first step."""
    pipe.set(rkeys.job_chunk(job_id, chunk_id), "\n".join(lines) + "\n")
    pipe.hset(rkeys.job_batches(job_id), chunk_id, chunk.dumps())
    pipe.sadd(rkeys.job_in_batch(job_id), *indices)
    pipe.zadd(rkeys.BATCH_DUE, {f"{job_id}\n{chunk_id}": 0})


class ChunkWriter:
    """Groups a job's claimed rows into Batch API input files (one endpoint and model each) within
    the provider's limits, and stores each full file as a chunk of the job (submit side)."""

    def __init__(self, client: redis.Redis, job_id: str, config: Config, options: dict[str, Any]) -> None:
        self.client = client
        self.job_id = job_id
        self.config = config
        self.options = options
        self._open: dict[tuple[str, str], tuple[list[str], list[str], list[int]]] = {}
        self._models: dict[str, tuple[frozenset[str], int, int]] = {}
        self.chunks = 0

    def model(self, model: str) -> tuple[frozenset[str], int, int]:
        """The providers whose keys serve ``model``, and the most rows and bytes a chunk of it may
        hold: the config's, within what a batch of each of them takes (:data:`~opt_queue.providers.BATCH_LIMITS`)."""
        found = self._models.get(model)
        if found is None:
            providers = serving(self.config.keys(), model)
            found = self._models[model] = (
                providers, min([self.config.batch_max_lines, *(BATCH_LIMITS[p][0] for p in providers or {"openai"})]),
                min([self.config.batch_max_bytes, *(BATCH_LIMITS[p][1] for p in providers or {"openai"})]))
        return found

    def add(self, index: str, body: dict[str, Any], url: str) -> None:
        """Add a claimed row (as a task carries it: index, request, endpoint)."""
        model = str(body.get("model") or "")
        _providers, most_lines, most_bytes = self.model(model)
        line = file_line(index, url, body)
        tokens = estimate_parts(body, url)[0]
        lines, indices, sizes = self._open.setdefault((url, model), ([], [], [0, 0]))
        limit = self.config.batch_token_limit
        if lines and (len(lines) >= most_lines or sizes[0] + len(line.encode()) + 1 > most_bytes
                      or (limit and sizes[1] + tokens > limit)):
            self._store(url, model)
            lines, indices, sizes = self._open.setdefault((url, model), ([], [], [0, 0]))
        lines.append(line)
        indices.append(index)
        sizes[0] += len(line.encode()) + 1
        sizes[1] += tokens

    def held(self) -> list[str]:
        """Rows added but not stored yet (to give back if the submit fails)."""
        return [i for _lines, indices, _sizes in self._open.values() for i in indices]

    def flush(self) -> None:
        for url, model in list(self._open):
            self._store(url, model)

    def _store(self, url: str, model: str) -> None:
        lines, indices, sizes = self._open.pop((url, model))
        chunk_id = str(self.client.hincrby(rkeys.job_meta(self.job_id), "chunks", 1))
        pipe = self.client.pipeline()
        store_chunk(pipe, self.job_id, chunk_id, Chunk(url, model, len(lines), sizes[1], self.options),
                    lines, indices)
        pipe.execute()
        self.chunks += 1


HANDOFF_SECONDS = 3.0
"""What the hand-off itself takes at the cut-over: a look at each batch, its cancel, the download of
what it answered, and the workers taking the rows (a dispatch tick)."""
CANCEL_POLL = 0.5
"""Seconds between two looks at a batch that is being cancelled."""


def cutover_at(deadline: float, now: float, sync_seconds: float | None = None, reserve: float = 0.25) -> float:
    """When the batch lane hands its leftovers to the synchronous lane: with the last ``reserve``
    of the time to the deadline left for them, or more when the keys' known limits say that
    sending every row synchronously takes longer (``sync_seconds``, with a quarter more for
    safety), plus the hand-off's own time (:data:`HANDOFF_SECONDS`); never before ``now`` (then
    every row goes synchronously at once)."""
    left = max(deadline * reserve, 1.25 * sync_seconds if sync_seconds else 0.0) + HANDOFF_SECONDS
    return max(now, now + deadline - left)


def chunk_states(client: redis.Redis, job_id: str) -> dict[str, Chunk]:
    """Every chunk of a job and its state (``status``)."""
    return {k.decode(): Chunk.loads(v) for k, v in client.hgetall(rkeys.job_batches(job_id)).items()}


def wake(client: redis.Redis, job_id: str, now: bool = True) -> int:
    """Make every unfinished chunk of a job due: now (``cancel``: its worker then cancels the batch
    of a stopped job, keeps what it answered and leaves the rest unanswered), or, with ``now``
    False, only those whose next step Redis lost (``submit`` does this). Return how many."""
    live = [c for c, st in chunk_states(client, job_id).items() if st.state != "done"]
    if live:
        client.zadd(rkeys.BATCH_DUE, {f"{job_id}\n{c}": 0 for c in live}, nx=not now)
    return len(live)
