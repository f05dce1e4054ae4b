"""A Redis master, its replicas and three Sentinels on loopback, for failover tests and benchmarks.

Real ``redis-server`` processes (``--sentinel`` for the Sentinels), each on a free port in its own
directory; :meth:`SentinelCluster.kill_master` SIGKILLs the master, and the Sentinels promote a
replica within a few seconds (down-after 1 s).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from opt_queue.jobflow.local import find_redis_server, free_port

MASTER = "oqmaster"


class SentinelCluster:
    def __init__(self, directory: Path, replicas: int = 2, sentinels: int = 3,
                 password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.master_port = self.ports[0]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{p}" for p in self.sentinel_ports) + "/0"

    def _start(self, port: int, args: list[str]) -> None:
        where = self.directory / str(port)
        where.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [find_redis_server(), *args], cwd=where, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def _redis_args(self, port: int) -> list[str]:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory / str(port)), "--logfile", "redis.log",
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def start(self) -> SentinelCluster:
        self._start(self.master_port, self._redis_args(self.master_port))
        self._wait(self.master_port)
        for port in self.ports[1:]:
            self._start(port, [*self._redis_args(port), "--replicaof", "127.0.0.1", str(self.master_port)])
        for port in self.ports[1:]:
            self._wait(port)
        for port in self.sentinel_ports:
            where = self.directory / str(port)
            where.mkdir(parents=True, exist_ok=True)
            conf = where / "sentinel.conf"
            lines = [f"port {port}", "bind 127.0.0.1", f"dir {where}", "logfile sentinel.log",
                     f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2",
                     f"sentinel down-after-milliseconds {MASTER} 1000",
                     f"sentinel failover-timeout {MASTER} 4000",
                     f"sentinel parallel-syncs {MASTER} 2"]
            if self.password:
                lines.append(f"sentinel auth-pass {MASTER} {self.password}")
            conf.write_text("\n".join(lines) + "\n")
            self._start(port, [str(conf), "--sentinel"])
        for port in self.sentinel_ports:
            self._wait(port, sentinel=True)
        deadline = time.monotonic() + 30
        while self.replicas_in_sync() < len(self.ports) - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not sync with the master")
            time.sleep(0.1)
        return self

    def _client(self, port: int, sentinel: bool = False, **kw: Any) -> redis.Redis:
        return redis.Redis(port=port, password=None if sentinel else self.password,
                           socket_connect_timeout=0.5, socket_timeout=2, **kw)

    def _wait(self, port: int, sentinel: bool = False) -> None:
        deadline = time.monotonic() + 15
        client = self._client(port, sentinel)
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def replicas_in_sync(self) -> int:
        info = self._client(self.master_port).info("replication")
        return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                   and v.get("state") == "online")

    def master(self) -> int:
        """The port the Sentinels name as the master now."""
        for port in self.sentinel_ports:
            try:
                _host, got = self._client(port, sentinel=True).sentinel_get_master_addr_by_name(MASTER)
                return int(got)
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no Sentinel answers")

    def master_client(self) -> redis.Redis:
        return self._client(self.master(), socket_keepalive=False)

    def kill_master(self) -> int:
        """SIGKILL the master; return its port."""
        port = self.master()
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()
        return port

    def wait_failover(self, old: int, timeout: float = 60) -> int:
        """Wait until the Sentinels name a new master that answers as one; return its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master()
                if port != old and self._client(port).info("replication").get("role") == "master":
                    return port
            except (redis.RedisError, RuntimeError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no failover within {timeout:.0f}s")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()
