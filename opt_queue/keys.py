"""Every Redis key name opt-queue uses, built in one place.

Job keys wrap the job id in a hash tag (``oq:{job}:...``) and the rate-limit keys share the tag
``{limits}``, so that each Lua script touches a single Redis Cluster slot.
"""

from __future__ import annotations

PREFIX = "oq"
JOBS = f"{PREFIX}:jobs"
QUEUE = "opt-queue"
COLLECTOR_GROUP = "collectors"


def job_meta(job: str) -> str:
    """Hash: input/output paths, model, counters (claimed, reported, released), status."""
    return f"{PREFIX}:{{{job}}}:meta"


def job_claimed(job: str) -> str:
    """Bitmap by row position: a task for this row was enqueued and has not been released."""
    return f"{PREFIX}:{{{job}}}:claimed"


def job_done(job: str) -> str:
    """Bitmap by row position: the row's final result (answer or null) was published."""
    return f"{PREFIX}:{{{job}}}:done"


def job_results(job: str) -> str:
    """Stream of finished rows, read by the collector's consumer group."""
    return f"{PREFIX}:{{{job}}}:results"


def job_retired(job: str) -> str:
    """Hash: key fingerprint -> why the key was retired for this job."""
    return f"{PREFIX}:{{{job}}}:retired"


LIMITS_TAG = "{limits}"


def bucket_window(bucket: str, dim: str, period: float) -> str:
    """Sorted set: the admissions of one bucket (key or group) in one window (sliding log)."""
    return f"{PREFIX}:{LIMITS_TAG}:{bucket}:{dim}:{period:g}"


def bucket_state(bucket: str) -> str:
    """Hash: cooldown deadline, learned limits, counters of one bucket (key or key group)."""
    return f"{PREFIX}:{LIMITS_TAG}:{bucket}:state"


def key_stats(fingerprint: str) -> str:
    """Hash: requests, tokens, errors and retirement of one key, for ``status``."""
    return f"{PREFIX}:{LIMITS_TAG}:key:{fingerprint}"


KNOWN_KEYS = f"{PREFIX}:{LIMITS_TAG}:known"
"""Hash: fingerprint -> JSON description (limits, bucket, api_base host) for ``status``."""


def job_answered(job: str) -> str:
    """Bitmap by row position: the published result was an answer (not a null)."""
    return f"{PREFIX}:{{{job}}}:answered"


def job_keys(job: str) -> list[str]:
    """Every key of one job."""
    return [job_meta(job), job_claimed(job), job_done(job), job_answered(job), job_results(job),
            job_retired(job)]
