"""The original ``openai-parallel-toolkit`` API on the opt-queue engine.

Switch by changing one import line::

    from opt_queue import ParallelToolkit, Prompt, OpenAIModel

Without ``broker_url`` everything runs here (a private Redis and local workers, started on first
use and stopped by :meth:`ParallelToolkit.close`, at exit, or when a ``with`` block ends); with
``broker_url`` the calls go to that broker and its fleet of workers.
"""

from __future__ import annotations

import atexit
import json
import logging
import signal
import tempfile
import threading
import uuid
from collections.abc import Hashable
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console

from opt_queue import providers
from opt_queue.queue.app import configure
from opt_queue.jobflow.collector import errors_path, gather
from opt_queue.core.config import Config, ModelConfig, load_config
from opt_queue.jobflow.dataset import Row, merge
from opt_queue.store.jobs import Job
from opt_queue.jobflow.local import EmbeddedRedis, LocalWorkers
from opt_queue.queue.broker import push
from opt_queue.jobflow.producer import enqueue, envelopes
from opt_queue.store.redis_conn import connect
from opt_queue.core.request import seed_messages
from opt_queue.cli.ui import Display, print_summary

log = logging.getLogger(__name__)


class Prompt(NamedTuple):
    """One request in the seed format: a system ``instruction`` and a user ``input``."""

    instruction: str
    input: str


class OpenAIModel:
    """A model name and the request parameters (temperature, max_tokens, ...) sent with every row."""

    def __init__(self, model_name: str = "gpt-3.5-turbo-0613", **params: Any) -> None:
        self.model_name = model_name
        self.params = params

    def __repr__(self) -> str:
        return f"OpenAIModel({self.model_name!r}, **{self.params!r})"


class ParallelToolkit:
    """Process a dataset, or a dict of prompts, or one prompt, in parallel across keys."""

    def __init__(self, config_path: str, openai_model: OpenAIModel | None = None,
                 input_path: str | None = None, output_path: str | None = None, threads: int = 20,
                 name: str = "ParallelToolkit Progress", max_retries: int = 5) -> None:
        self.config_path = config_path
        self.openai_model = openai_model
        self.input_path = input_path
        self.output_path = output_path
        self.threads = threads
        self.name = name
        self.max_retries = max_retries
        self.config = self._load_config()
        self._engine: _Engine | None = None
        self.last_status: Any = None

    def __repr__(self) -> str:
        return f"<ParallelToolkit {self.config.model.name} input={self.input_path!r} output={self.output_path!r}>"

    def _load_config(self) -> Config:
        """config.json, with this object's model (when given), retries and threads on top."""
        cfg = load_config(self.config_path)
        providers.check_installed(cfg)  # a provider's SDK missing: refused before anything is paid
        update: dict[str, Any] = {"max_retries": self.max_retries, "concurrency": self.threads}
        if self.openai_model is not None:
            update["model"] = ModelConfig(name=self.openai_model.model_name, fallback=cfg.model.fallback,
                                          **self.openai_model.params)
        return cfg.model_copy(update=update)

    # -- datasets -------------------------------------------------------------------------------
    def run(self) -> None:
        """Process ``input_path`` into ``output_path``, resuming: only missing and null rows are sent."""
        from opt_queue.jobflow.runner import run_job

        if not self.input_path or not self.output_path:
            raise ValueError("run() needs input_path and output_path")
        console = Console(stderr=True)
        with Display(console, collect_label=self.name) as display:
            result = run_job(self.input_path, self.output_path, self.config, config_path=self.config_path,
                             on_submit=display.submitted, on_progress=display.collected,
                             worker_overrides=self._worker_overrides())
        self.last_status = result.collected
        print_summary(console, result.collected, self.output_path, errors_path(self.output_path))

    def merge(self, merged_path: str) -> None:
        """Write the input rows with their ``"output"`` as one JSON array (indent 4)."""
        if not self.input_path or not self.output_path:
            raise ValueError("merge() needs input_path and output_path")
        merge(self.input_path, self.output_path, merged_path)

    # -- in memory ------------------------------------------------------------------------------
    def parallel_api(self, data: dict[Hashable, Prompt]) -> dict[Hashable, str | None]:
        """Answer every prompt; return the answers keyed by the same ids (None for a failure)."""
        ids = {str(k): k for k in data}
        if len(ids) != len(data):
            raise ValueError("parallel_api() needs ids that stay distinct as strings")
        rows = []
        for seq, (index, original) in enumerate(ids.items()):
            prompt = data[original]
            body = {"messages": seed_messages(prompt.instruction, prompt.input)}
            rows.append(Row(seq=seq, line=seq + 1, index=index, body=body, raw={}))
        engine = self._ensure_engine()
        job_id = "api-" + uuid.uuid4().hex[:12]
        enqueue(engine.client, job_id, rows, len(rows), self.config)

        def requeue(lost: set[str]) -> int:
            return push(engine.client, envelopes(job_id, [r for r in rows if r.index in lost], self.config))

        results = gather(engine.client, job_id, len(rows), requeue=requeue,
                         lease_seconds=self.config.lease_seconds)
        Job(engine.client, job_id).delete()
        return {ids[i]: results[i].answer if i in results else None for i in ids}

    def api(self, prompt: Prompt) -> str | None:
        """Answer one prompt; None when it failed for good."""
        return self.parallel_api({0: prompt})[0]

    # -- lifecycle ------------------------------------------------------------------------------
    def _worker_overrides(self) -> dict[str, Any]:
        return {"max_retries": self.max_retries}

    def _ensure_engine(self) -> _Engine:
        if self._engine is None:
            self._engine = _Engine.acquire(self.config, self.config_path, self.threads,
                                           self._worker_overrides())
        return self._engine

    def close(self) -> None:
        """Let go of the engine; the last toolkit using it stops its private Redis and workers."""
        if self._engine is not None:
            self._engine.release()
            self._engine = None

    def __enter__(self) -> ParallelToolkit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Engine:
    """A broker plus workers for in-memory calls: private ones unless ``broker_url`` is set.

    Toolkits with the same config share one engine (the seed examples build a new toolkit for
    every call); it stops when the last one closes, or at interpreter exit.
    """

    _shared: dict[str, _Engine] = {}
    _lock = threading.Lock()

    @classmethod
    def acquire(cls, config: Config, config_path: str, threads: int, overrides: dict[str, Any]) -> _Engine:
        ident = json.dumps([str(Path(config_path).resolve()), threads, overrides], sort_keys=True)
        with cls._lock:
            engine = cls._shared.get(ident)
            if engine is None:
                engine = cls._shared[ident] = cls(config, config_path, threads, overrides)
                engine.ident = ident
                if len(cls._shared) == 1:
                    atexit.register(cls.close_all)
            engine.users += 1
            return engine

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            self._shared.pop(self.ident, None)
        self.close()

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            engines = list(cls._shared.values())
            cls._shared.clear()
        for engine in engines:
            engine.close()

    def __init__(self, config: Config, config_path: str, threads: int, overrides: dict[str, Any]) -> None:
        self.ident = ""
        self.users = 0
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.redis: EmbeddedRedis | None = None
        self.workers: LocalWorkers | None = None
        if config.broker_url:
            url = config.broker_url
        else:
            self.tmp = tempfile.TemporaryDirectory(prefix="opt-queue-")
            self.redis = EmbeddedRedis(Path(self.tmp.name), persist=False).start()
            url = self.redis.url
        self.client = connect(url, check=True, master=config.sentinel_master)
        configure(url, config.visibility_timeout, config.sentinel_master)
        if self.redis is not None:
            self.workers = LocalWorkers(url, config_path, concurrency=threads, loglevel=config.log_level,
                                        overrides=overrides, events=False, die_signal=signal.SIGKILL).start()

    def close(self) -> None:
        if self.workers:
            self.workers.stop()
        self.client.close()
        if self.redis:
            self.redis.stop()
        if self.tmp:
            self.tmp.cleanup()

