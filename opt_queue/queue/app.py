"""The Celery application: Redis broker, late acks, I/O-bound defaults.

:func:`create_app` builds one; :func:`get_app` is the process's own, built on first use (importing
this module builds nothing). Its broker comes from :func:`configure` (the CLI calls it) or
``OPT_QUEUE_BROKER_URL``, so that ``celery -A opt_queue.queue.app worker`` (or ``flower``) works
too.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

from celery import Celery

from opt_queue.store import keys
from opt_queue.core.broker_url import is_sentinel, master_name

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def create_app(broker_url: str | None = None, visibility_timeout: int = 3600) -> Celery:
    """A Celery app with opt-queue's settings, pointed at ``broker_url`` (``OPT_QUEUE_BROKER_URL``,
    else a local Redis, when None; a Sentinel URL's master named by ``OPT_QUEUE_SENTINEL_MASTER``).
    Nothing connects until a message is sent or consumed."""
    app = Celery("opt_queue", include=["opt_queue.worker.tasks"])
    app.conf.update(
        task_default_queue=keys.QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A killed worker's rows are delivered again; publishing is idempotent by row, so that is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task of rows_per_task rows waits per pool thread: enough to keep rows flowing, few
        # enough that the rows a worker holds stay close to its concurrency (fair among workers).
        worker_prefetch_multiplier=1,
        worker_send_task_events=False,  # `opt-queue worker --events` (the default) turns them on
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=True,
    )
    _point(app, broker_url or os.environ.get("OPT_QUEUE_BROKER_URL", DEFAULT_BROKER), visibility_timeout)
    return app


_app: Celery | None = None
_building = threading.Lock()


def get_app() -> Celery:
    """The process's app (one per process: the worker's tasks are registered on it), built on
    first use."""
    global _app
    if _app is None:
        with _building:
            if _app is None:
                _app = create_app()
    return _app


def __getattr__(name: str) -> Celery:
    # ``celery -A opt_queue.queue.app`` and ``from opt_queue.queue.app import app`` find the
    # process's app; importing this module builds nothing
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_slots(rows_in_flight: int, rows_per_task: int) -> int:
    """Celery pool threads for a worker: twice the tasks it takes to fill ``rows_in_flight``.

    The threads only wait on their batch (the rows run on the worker's event loop, which caps
    them at ``rows_in_flight``); the spare half keeps the cap reached while a batch's last rows
    finish.
    """
    return max(2, 2 * math.ceil(rows_in_flight / rows_per_task))


def transport_options(visibility_timeout: int, master: str | None = None) -> dict[str, Any]:
    """Redis transport options: a killed worker's unacknowledged tasks go back to the queue once
    ``visibility_timeout`` has passed, noticed by a sweep every few seconds (kombu's default sweep
    runs a scan only every tenth 10-second tick, which left rows stranded for ~100 s). A worker
    killed in the middle of a sweep leaves the sweep's lock behind: it expires after 15 s, not
    kombu's 300 s. Under Sentinel, ``master_name`` tells kombu which master to follow."""
    options: dict[str, Any] = {"visibility_timeout": visibility_timeout, "unacked_restore_interval": 5,
                               "unacked_restore_throttle": 1, "unacked_mutex_expire": 15}
    if master:
        options["master_name"] = master
    return options


def configure(broker_url: str, visibility_timeout: int = 3600, master: str | None = None) -> Celery:
    """Point the process's app at ``broker_url`` (Sentinels: of the master named ``master``, else
    ``OPT_QUEUE_SENTINEL_MASTER``); return it."""
    app = get_app()
    if app.conf.broker_url != broker_url:
        app.close()  # drop pooled connections to the previous broker
    _point(app, broker_url, visibility_timeout, master)
    return app


def sentinel_master(app: Celery) -> str | None:
    """The Sentinel master ``app`` follows (None for one Redis)."""
    return (app.conf.broker_transport_options or {}).get("master_name")


def _point(app: Celery, broker_url: str, visibility_timeout: int, master: str | None = None) -> None:
    """A ``redis://`` broker uses kombu's Redis transport with one client per channel
    (``transport.py``) unless ``OPT_QUEUE_STOCK_TRANSPORT`` is set; a ``sentinel://`` one kombu's
    Sentinel channel."""
    app.conf.broker_url = broker_url
    master = master_name(master) if is_sentinel(broker_url) else None
    app.conf.broker_transport_options = transport_options(visibility_timeout, master)
    plain = broker_url.startswith("redis://") and not os.environ.get("OPT_QUEUE_STOCK_TRANSPORT")
    app.conf.broker_transport = "opt_queue.queue.transport:Transport" if plain else None
