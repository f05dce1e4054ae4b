"""Every Redis key name opt-queue uses, built in one place.

Job keys wrap the job id in a hash tag (``oq:{job}:...``) and the rate-limit keys share the tag
``{limits}``, so that each Lua script touches a single Redis Cluster slot.

A row's state is keyed by its input ``index``, never by its position in the file: a small decimal
index (``"0"``, ``"17"``) is a bit of the ``claimed`` and ``done`` bitmaps, any other index is a
field of the ``rows`` hash (see :func:`slot` and ``lua/_rows.lua``).
"""

from __future__ import annotations

from opt_queue.core.request import index_number

PREFIX = "oq"
JOBS = f"{PREFIX}:jobs"
QUEUE = "opt-queue"
COLLECTOR_GROUP = "collectors"
UNACKED = "unacked"
"""Kombu's Redis transport: hash delivery tag -> ``[message, exchange, routing key]`` of every
message delivered to a worker and not acknowledged yet."""
UNACKED_INDEX = "unacked_index"
"""Kombu's Redis transport: sorted set of those delivery tags, scored by delivery time (seconds)."""
RECOVERY_LOCK = f"{PREFIX}:recovery-lock"

def slot(index: str) -> str:
    """Where a row's state lives, as the Lua scripts take it: ``"17"`` (bit 17 of the bitmaps) or
    ``"s<index>"`` (field ``<index>`` of the rows hash)."""
    n = index_number(index)
    return str(n) if n is not None else "s" + index


def job_meta(job: str) -> str:
    """Hash: input/output paths and fingerprint, model, counters (claimed, reported, released), status."""
    return f"{PREFIX}:{{{job}}}:meta"


def job_claimed(job: str) -> str:
    """Bitmap by decimal index: a task was enqueued for the row, or its result awaits collection."""
    return f"{PREFIX}:{{{job}}}:claimed"


def job_done(job: str) -> str:
    """Bitmap by decimal index: the row's final result (answer or null) was published."""
    return f"{PREFIX}:{{{job}}}:done"


def job_rows(job: str) -> str:
    """Hash: other index -> its flags (1 claimed, 2 done), for indices that are not small decimals."""
    return f"{PREFIX}:{{{job}}}:rows"


def row_state(job: str) -> list[str]:
    """The three keys of the row state, in the order every row script takes them (KEYS[1..3])."""
    return [job_claimed(job), job_done(job), job_rows(job)]


def job_results(job: str) -> str:
    """Stream of finished rows, read by the collector's consumer group."""
    return f"{PREFIX}:{{{job}}}:results"


def job_retired(job: str) -> str:
    """Hash: key fingerprint -> why the key was retired for this job."""
    return f"{PREFIX}:{{{job}}}:retired"


def job_leases(job: str) -> str:
    """Sorted set: index -> when its lease expires (ms, Redis' clock); rows being worked on."""
    return f"{PREFIX}:{{{job}}}:leases"


def job_lease_owners(job: str) -> str:
    """Hash: index -> the worker process that holds its lease."""
    return f"{PREFIX}:{{{job}}}:lease-owners"


def job_requests(job: str) -> str:
    """Hash: a request's hash -> "slot\\nindex" of the job's first row with it (``lua/dedupe.lua``)."""
    return f"{PREFIX}:{{{job}}}:requests"


def job_copies(job: str) -> str:
    """Hash: a pending row's index -> JSON list of its copies ("slot\\nindex"), rows with the same request."""
    return f"{PREFIX}:{{{job}}}:copies"


def job_batches(job: str) -> str:
    """Hash: chunk id -> JSON state of one batch-lane chunk (its rows' file, its provider batch)."""
    return f"{PREFIX}:{{{job}}}:batches"


def job_chunk(job: str, chunk: str) -> str:
    """String: the Batch API input file (JSONL) of one chunk, until its batch is finished."""
    return f"{PREFIX}:{{{job}}}:chunk:{chunk}"


def job_in_batch(job: str) -> str:
    """Set: indices of rows that are in a batch-lane chunk now (no task message holds them)."""
    return f"{PREFIX}:{{{job}}}:in-batch"


BATCH_DUE = f"{PREFIX}:batch-due"
"""Sorted set: ``job\nchunk`` -> when (ms, Redis' clock) the chunk's next step is due; a worker
that takes a step pushes it a lease length ahead while it works (``lua/due.lua``)."""


def batch_owner(fingerprint: str, batch_id: str) -> str:
    """String: the ``job\nchunk`` a provider's batch belongs to (so that a lost batch of a provider
    that keeps no metadata is adopted by one chunk only), kept as long as a batch may run."""
    return f"{PREFIX}:batch-owner:{fingerprint}:{batch_id}"


def batch_enqueued(fingerprint: str, model: str) -> str:
    """Hash of one key and model in the Batch API: ``tokens`` enqueued now, ``limit`` learned."""
    return f"{PREFIX}:batch-key:{fingerprint}:{model}"


def cached_answer(request_hash: str) -> str:
    """String: a request's answer, kept ``cache.ttl`` for any job that sends the same request."""
    return f"{PREFIX}:cache:{request_hash}"


LIMITS_TAG = "{limits}"


def bucket_window(bucket: str, dim: str, period: float) -> str:
    """Sorted set: the admissions of one bucket (key or group) in one window (sliding log)."""
    return f"{PREFIX}:{LIMITS_TAG}:{bucket}:{dim}:{period:g}"


def bucket_state(bucket: str) -> str:
    """Hash: cooldown, learned limits, probe state, counters of one scope (a bucket for one model)."""
    return f"{PREFIX}:{LIMITS_TAG}:{bucket}:state"


def key_stats(fingerprint: str) -> str:
    """Hash: requests, tokens, errors and retirement of one key, for ``status``."""
    return f"{PREFIX}:{LIMITS_TAG}:key:{fingerprint}"


KNOWN_KEYS = f"{PREFIX}:{LIMITS_TAG}:known"
"""Hash: fingerprint -> JSON description (limits, bucket, api_base host) for ``status``."""
KNOWN_SCOPES = f"{PREFIX}:{LIMITS_TAG}:scopes"
"""Hash: scope (``bucket/model``) -> JSON of its bucket, model and windows, for ``status``."""


def job_keys(job: str) -> list[str]:
    """Every key of one job."""
    return [job_meta(job), *row_state(job), job_results(job), job_retired(job), job_leases(job),
            job_lease_owners(job), job_requests(job), job_copies(job), job_batches(job), job_in_batch(job)]
