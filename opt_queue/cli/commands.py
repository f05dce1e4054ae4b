"""The ``opt-queue`` command line: thin commands over the library."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from opt_queue import __version__
from opt_queue.jobflow.collector import Collector, CollectStatus, errors_path
from opt_queue import providers
from opt_queue.core.config import Config, load_config
from opt_queue.core.errors import ConfigError, Interrupted, OptQueueError
from opt_queue.store.jobs import Job, job_id_for
from opt_queue.core.broker_url import redact_url
from opt_queue.store.redis_conn import connect
from opt_queue.core.tokens import TOKEN_COUNTS
from opt_queue.cli.ui import Display, print_summary, run_and_report

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def friendly(fn: F) -> F:
    """Turn our errors into one red line and an exit code; Ctrl-C and SIGTERM into a clean stop
    (exit 130) that keeps what was answered."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: ``worker`` installs Celery's own
        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:
            console.print(f"[yellow]{escape(str(exc))}[/]", highlight=False, markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except OptQueueError as exc:
            # escaped: a message's own brackets ("opt-queue[anthropic]", "api_keys[1]") are text
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing is lost; run the same command again to resume.")
            sys.exit(130)
    return wrapper  # type: ignore[return-value]


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``OPT_QUEUE_LOG_FORMAT=json``), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("OPT_QUEUE_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    for noisy in ("httpx", "httpx2", "openai", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_path(path: str | None) -> str | None:
    """The config file to read: the one given, else ./config.json if it exists (else none)."""
    if path is None and Path("config.json").exists():
        return "config.json"
    return path


def _config(path: str | None, require_keys: bool = True) -> Config:
    path = _config_path(path)
    _setup_logging("INFO")
    cfg = load_config(path, require_keys=require_keys)
    providers.check_installed(cfg)  # a provider's SDK missing: refused before anything is paid
    logging.getLogger().setLevel(getattr(logging, cfg.log_level.upper(), logging.INFO))
    return cfg


def _broker(cfg: Config) -> str:
    if not cfg.broker_url:
        raise ConfigError("no broker: set \"broker_url\" in the config or OPT_QUEUE_BROKER_URL "
                          "(or use `opt-queue run`, which starts a private Redis)")
    return cfg.broker_url


config_option = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                             help="config.json (default: ./config.json, else the environment).")
metrics_port_option = click.option("--metrics-port", type=int, default=None, envvar="OPT_QUEUE_METRICS_PORT",
                                   help="Serve Prometheus metrics on this port (/metrics). Env: OPT_QUEUE_METRICS_PORT.")
metrics_addr_option = click.option("--metrics-addr", default="127.0.0.1", show_default=True,
                                   envvar="OPT_QUEUE_METRICS_ADDR",
                                   help="Address of the metrics endpoint (0.0.0.0 for a Prometheus elsewhere). "
                                        "Env: OPT_QUEUE_METRICS_ADDR.")


def _serve_metrics(port: int | None, addr: str) -> None:
    if port is None:
        return
    from opt_queue.engine.metrics import serve

    try:
        serve(port, addr)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {addr}:{port} ({exc.strerror}); choose another "
                          f"--metrics-port") from None


format_option = click.option(
    "--output-format", type=click.Choice(["seed", "full", "batch"]), default=None,
    help="Output lines: seed {index: answer}, full {index: {text, finish_reason, usage, tool_calls, "
         "parsed}}, batch (the Batch API's output line). Default: the config's output_format, else "
         "batch for Batch-format input and seed for the rest.")


retry_failed_option = click.option(
    "--retry-failed", is_flag=True,
    help="Send again the nulls that failed for a reason the same request meets again (context length, "
         "too large for every key, a content filter or refusal, an answer that kept missing its JSON "
         "schema). Without it a re-run retries only nulls whose reason was transient, or whose request "
         "changed (model, fallback, parameters).")


output_tokens_option = click.option("--output-tokens", type=click.IntRange(min=0), default=None,
                                    help="Average output tokens per answer to assume (default: every "
                                         "answer at its cap, max_tokens or the endpoint's default).")


def lane_option(fn: Any) -> Any:
    """``--lane`` and ``--deadline``."""
    fn = click.option(
        "--deadline", default=None, metavar="DURATION",
        help="Finish by then (6h, 90min, 2d): the batch lane first, and at the cut-over (the last quarter "
             "of the time, or what the keys' configured limits need) the rows not answered yet go through "
             "the synchronous lane. Implies --lane batch.")(fn)
    return click.option(
        "--lane", type=click.Choice(["sync", "flex", "batch"]), default=None,
        help="sync: standard synchronous calls; flex: service_tier flex (half price, slower; a row Flex "
             "cannot take now goes at the standard tier unless flex_fallback is false); batch: each "
             "provider's batch API (OpenAI's Batch API, Anthropic's Message Batches, Gemini's Batch Mode: "
             "half price, within 24 h). Default: the config's lane.")(fn)


def _with_format(cfg: Config, output_format: str | None, lane: str | None = None,
                 deadline: str | None = None, retry_failed: bool = False) -> Config:
    """The config with the command line's choices over it (validated as the file is)."""
    update: dict[str, Any] = {name: value for name, value in (("output_format", output_format), ("lane", lane),
                                                              ("retry_failed", retry_failed)) if value}
    if deadline:
        update["deadline"] = deadline
        if lane is None and "lane" not in cfg.model_fields_set:
            update["lane"] = "batch"
    if not update:
        return cfg
    try:
        return Config.model_validate({**cfg.model_dump(exclude_unset=True, exclude={"api_keys"}),
                                      "api_keys": cfg.api_keys, **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or next(iter(update))
        raise ConfigError(f"--{where.replace('_', '-')}: {error['msg'].removeprefix('Value error, ')}") from None


ENV_FILE = "OPT_QUEUE_ENV_FILE"


def _load_env_file() -> None:
    """Read ``./.env`` (or ``$OPT_QUEUE_ENV_FILE``; empty: none) into the environment, without
    overriding what is set already: the same file docker compose reads, so that host commands
    find the compose fleet's Redis (``OPT_QUEUE_BROKER_URL``) with nothing more typed."""
    from dotenv import load_dotenv

    name = os.environ.get(ENV_FILE, ".env")
    if name and Path(name).is_file():
        load_dotenv(name, override=False)


@click.group()
@click.version_option(__version__, prog_name="opt-queue")
def main() -> None:
    """Push JSONL datasets of prompts through OpenAI-compatible APIs, in parallel, safely.

    Settings come from config.json (-c) and the OPT_QUEUE_* environment, which a .env file in the
    current directory may hold (OPT_QUEUE_ENV_FILE names another; empty: none)."""
    _load_env_file()


@main.command()
@click.argument("input_path", type=click.Path(dir_okay=False))
@config_option
@click.option("-o", "--output", default="output.jsonl", show_default=True, help="Output JSONL file.")
@click.option("--job", "job_name", help="Job name (default: derived from the output path).")
@click.option("--skip-bad-lines", is_flag=True, help="Enqueue the valid rows and list the bad ones.")
@format_option
@lane_option
@retry_failed_option
@friendly
def submit(input_path: str, config_path: str | None, output: str, job_name: str | None,
           skip_bad_lines: bool, output_format: str | None, lane: str | None, deadline: str | None,
           retry_failed: bool) -> None:
    """Enqueue the rows that output.jsonl does not answer yet (rows_per_task rows to a task)."""
    from opt_queue.queue.app import configure
    from opt_queue.jobflow.dataset import check_writable, validate_input
    from opt_queue.jobflow.producer import finished, job_output_format
    from opt_queue.jobflow.producer import submit as do_submit

    cfg = _with_format(_config(config_path, require_keys=False), output_format, lane, deadline, retry_failed)
    url = _broker(cfg)
    job = job_id_for(output, job_name)
    done = finished(job, input_path, output)
    if done is not None:  # finished before, and both files are as they were then
        out.print(f"job [bold]{job}[/]: {done.describe()}; {output} answers every row")
        return
    # Everything that can be checked is checked before a row is enqueued (and paid for); the
    # output file itself is read by submit before it touches the job's state.
    check_writable(output)
    validated = validate_input(input_path, skip_bad=skip_bad_lines)
    job_output_format(cfg, validated, output)
    client = connect(url, check=True, master=cfg.sentinel_master)
    configure(url, cfg.visibility_timeout, cfg.sentinel_master)
    with Display(console) as display:
        report = do_submit(client, job, input_path, output, cfg, skip_bad=skip_bad_lines,
                           on_progress=display.submitted, on_wait=display.waiting, validated=validated)
    out.print(f"job [bold]{job}[/]: {report.describe()}")
    if report.cutover_at is not None:
        cut = time.strftime("%H:%M:%S", time.localtime(report.cutover_at))
        sync = (f"; sending them synchronously takes about {report.sync_seconds:.0f}s at the keys' configured "
                f"limits" if report.sync_seconds else "")
        out.print(f"deadline in {cfg.deadline:.0f}s: the batch lane until {cut}, then the rows not answered "
                  f"yet go synchronously{sync}")
    if report.input_changed:
        console.print(f"{input_path} changed since the job's last submit; rows are matched by index")
    if report.uncollected:
        console.print(f"run `opt-queue collect -o {output}` to write the {report.uncollected} finished rows")
    if report.bad_lines:
        console.print(f"[yellow]{report.bad_lines} bad line(s) of {input_path} were skipped[/]")


@main.command()
@config_option
@click.option("--concurrency", type=int, envvar="OPT_QUEUE_CONCURRENCY",
              help="Rows in flight per worker (default: config concurrency, 256). Env: OPT_QUEUE_CONCURRENCY.")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default="threads",
              show_default=True, envvar="OPT_QUEUE_POOL", help="Celery execution pool. Env: OPT_QUEUE_POOL.")
@click.option("--loglevel", default=None, envvar="OPT_QUEUE_LOG_LEVEL",
              help="Log level (default: config log_level). Env: OPT_QUEUE_LOG_LEVEL.")
@click.option("--hostname", default=None,
              help="Celery worker name (default: opt-queue-PID@host, distinct for each worker process).")
@click.option("--events/--no-events", default=True, envvar="OPT_QUEUE_EVENTS", show_default=True,
              help="Send task events (Flower needs them; off saves CPU per row). Env: OPT_QUEUE_EVENTS.")
@metrics_port_option
@metrics_addr_option
@friendly
def worker(config_path: str | None, concurrency: int | None, pool: str, loglevel: str | None,
           hostname: str | None, events: bool, metrics_port: int | None, metrics_addr: str) -> None:
    """Run a worker that answers rows from the broker's queue."""
    from opt_queue.queue.app import configure, task_slots
    from opt_queue.store import keys
    from opt_queue.worker import tasks

    cfg = _config(config_path)
    url = _broker(cfg)
    connect(url, check=True, master=cfg.sentinel_master)
    if concurrency:  # the engine caps rows in flight at it
        cfg = cfg.model_copy(update={"concurrency": concurrency})
    tasks.use(cfg)  # handed to the worker's runtime (and, forked, to a prefork pool's children)
    app = configure(url, cfg.visibility_timeout, cfg.sentinel_master)
    level = (loglevel or cfg.log_level).upper()
    _setup_logging(level)
    if metrics_port is not None and pool == "prefork":
        raise ConfigError("--metrics-port counts what this process does: use --pool threads (the default) "
                          "or solo with it, or run one worker per core")
    _serve_metrics(metrics_port, metrics_addr)
    rows_in_flight = concurrency or cfg.concurrency
    logging.getLogger(__name__).info("worker for %s with %d keys, up to %d rows in flight",
                                     redact_url(url), len(cfg.api_keys), rows_in_flight)
    argv = ["worker", "--pool", pool, "--concurrency", str(task_slots(rows_in_flight, cfg.rows_per_task)),
            "-Q", keys.QUEUE, "--loglevel", level, "--without-mingle", "--without-gossip"]
    if events:
        argv.append("--events")
    # Celery's default name is celery@HOST: two workers on one host would be one in Flower.
    argv += ["--hostname", hostname or f"opt-queue-{os.getpid()}@%h"]
    app.worker_main(argv)


@main.command()
@config_option
@click.option("-o", "--output", default="output.jsonl", show_default=True, help="Output JSONL file.")
@click.option("--job", "job_name", help="Job name (default: derived from the output path).")
@click.option("--input", "input_path", help="The job's input file (default: the path submit recorded).")
@click.option("--follow", is_flag=True, help="Keep collecting while rows are still being submitted.")
@metrics_port_option
@metrics_addr_option
@friendly
def collect(config_path: str | None, output: str, job_name: str | None, input_path: str | None,
            follow: bool, metrics_port: int | None, metrics_addr: str) -> None:
    """Stream finished rows into output.jsonl; rewrite it in input order when the job is complete."""
    from opt_queue.jobflow.dataset import check_writable

    cfg = _config(config_path, require_keys=False)
    check_writable(output)
    client = connect(_broker(cfg), check=True, patient=True, master=cfg.sentinel_master)
    job = job_id_for(output, job_name)
    _serve_metrics(metrics_port, metrics_addr)
    with Display(console) as display:
        def progress(status: CollectStatus) -> None:
            display.collected(status)
            if metrics_port is not None and status.progress is not None:
                from opt_queue.engine.metrics import observe_job

                observe_job(job, status.answered, status.nulls, status.remaining, status.progress.spend,
                            status.keys)

        status = Collector(client, job, output, input_path, config=cfg).run(follow=follow, on_progress=progress)
    print_summary(out, status, output, errors_path(output))
    if not status.complete:
        sys.exit(1)


@main.command()
@click.argument("input_path", type=click.Path(dir_okay=False))
@config_option
@click.option("-o", "--output", default="output.jsonl", show_default=True, help="Output JSONL file.")
@click.option("--job", "job_name", help="Job name (default: derived from the output path).")
@click.option("--workers", type=int, default=None,
              help="Local worker processes (default: one per CPU core, at most 4; 0: use the fleet).")
@click.option("--skip-bad-lines", is_flag=True, help="Process the valid rows and list the bad ones.")
@format_option
@lane_option
@click.option("--dry-run", is_flag=True, help="Print the estimate (rows, tokens, cost, ETA) and stop: no API call.")
@output_tokens_option
@retry_failed_option
@friendly
def run(input_path: str, config_path: str | None, output: str, job_name: str | None, workers: int,
        skip_bad_lines: bool, output_format: str | None, lane: str | None, deadline: str | None, dry_run: bool,
        output_tokens: int | None, retry_failed: bool) -> None:
    """Submit, work and collect a whole job on this machine (private Redis unless broker_url is set)."""
    config_path = _config_path(config_path)
    cfg = _with_format(_config(config_path), output_format, lane, deadline, retry_failed)
    if dry_run:
        _print_estimate(input_path, output, cfg, output_tokens, False)
        return
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    if workers == 0 and not cfg.broker_url:
        raise ConfigError("--workers 0 leaves the work to a fleet, which needs \"broker_url\" (or "
                          "OPT_QUEUE_BROKER_URL); without one, give --workers 1 or more")
    status = run_and_report(console, out, input_path, output, cfg, config_path, job_name, workers, skip_bad_lines)
    if not status.complete:
        sys.exit(1)


def _print_estimate(input_path: str, output: str, cfg: Config, output_tokens: int | None, as_json: bool,
                    probe: bool = False) -> None:
    from opt_queue.jobflow import probe as probing
    from opt_queue.jobflow.estimate import describe, estimate
    from opt_queue.core.prices import Prices

    known: Any = None
    if probe:
        if not cfg.keys():
            raise ConfigError("--probe needs api_keys in the config: it asks each key's limits of the API")
        prices = Prices({name: p.model_dump() for name, p in cfg.prices.items()})

        def known(model: str) -> Any:
            return probing.probe(cfg, model, prices)
    elif cfg.broker_url:  # the limits the fleet learned before, if its Redis answers
        try:
            client = connect(cfg.broker_url, check=True, timeout=2.0, master=cfg.sentinel_master)

            def known(model: str) -> Any:
                return probing.learned(client, cfg, model)
        except OptQueueError:
            known = None
    est = estimate(input_path, output, cfg, output_tokens, known)  # a bad line is reported as by submit
    if as_json:
        out.print_json(json.dumps(est.as_dict()))
    else:
        for line in describe(est):
            out.print(line, highlight=False)


@main.command()
@click.argument("input_path", type=click.Path(dir_okay=False))
@config_option
@click.option("-o", "--output", default="output.jsonl", show_default=True,
              help="Output JSONL file (rows it answers are not counted: a re-run sends only the rest).")
@output_tokens_option
@lane_option
@retry_failed_option
@click.option("--probe", is_flag=True,
              help="Ask the API each key's limits for the ETA: one call per key and model (max_tokens 1; its "
                   "cost is shown). Without it, the ETA uses the configured limits, else those the fleet "
                   "learned before (broker_url).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@friendly
def estimate(input_path: str, config_path: str | None, output: str, output_tokens: int | None,
             lane: str | None, deadline: str | None, retry_failed: bool, probe: bool, as_json: bool) -> None:
    """Rows, tokens, cost range, rows too long for the context and ETA of a run; no API call
    unless --probe."""
    cfg = _with_format(_config(config_path, require_keys=False), None, lane, deadline, retry_failed)
    _print_estimate(input_path, output, cfg, output_tokens, as_json, probe)


@main.command()
@click.argument("input_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("output_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("merged_path", type=click.Path(dir_okay=False))
@friendly
def merge(input_path: str, output_path: str, merged_path: str) -> None:
    """Write the input rows with their "output" as one JSON array (indent 4)."""
    from opt_queue.jobflow.dataset import merge as do_merge

    count = do_merge(input_path, output_path, merged_path)
    out.print(f"wrote {count} rows to {merged_path}")


@main.command()
@config_option
@click.option("--job", "job_name", help="Only this job (a job id or name).")
@click.option("-o", "--output", help="Only the job of this output file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@friendly
def status(config_path: str | None, job_name: str | None, output: str | None, as_json: bool) -> None:
    """Show progress per job and usage per key."""
    from opt_queue.jobflow.runner import private_broker
    from opt_queue.jobflow.status import snapshot
    from opt_queue.cli.ui import status_tables

    cfg = _config(config_path, require_keys=False)
    url = cfg.broker_url or (private_broker(output) if output else None)
    job = job_name or (job_id_for(output) if output else None)
    if url is None and output:
        snap = _stopped_run_snapshot(output, job, cfg)
        if snap is None:
            raise ConfigError(f"no broker: no `opt-queue run` is working on {output} now nor left its state "
                              f"beside it, and neither \"broker_url\" nor OPT_QUEUE_BROKER_URL is set")
    else:
        client = connect(_broker(cfg) if url is None else url, check=True, master=cfg.sentinel_master)
        snap = snapshot(client, job, cfg.learned_limits_ttl)
    if as_json:
        click.echo(json.dumps(snap, indent=2, ensure_ascii=False))
        return
    for table in status_tables(snap, out.width):
        out.print(table)
    if snap.get("stopped_run"):
        out.print(f"(an interrupted `opt-queue run`: its state is kept in {snap['stopped_run']}; run the same "
                  f"command again to resume)")


def _stopped_run_snapshot(output: str, job: str | None, cfg: Config) -> dict[str, Any] | None:
    """The status of an interrupted ``run``'s job, read from the private Redis' files beside its
    output (a Redis is started on them for the moment, then stopped)."""
    from opt_queue.jobflow.local import EmbeddedRedis
    from opt_queue.jobflow.runner import state_dir
    from opt_queue.jobflow.status import snapshot

    directory = state_dir(output)
    if not any((directory / name).exists() for name in ("appendonlydir", "appendonly.aof")):
        return None
    with EmbeddedRedis(directory) as private:
        client = connect(private.url, check=True)
        snap = snapshot(client, job, cfg.learned_limits_ttl)
        client.close()
    snap["stopped_run"] = str(directory)
    return snap


def _job(config_path: str | None, job_name: str | None, output: str | None, verb: str) -> tuple[Any, Any]:
    """The broker and the job that ``--job`` or ``-o`` names (for reset and cancel)."""
    if not (job_name or output):
        raise ConfigError(f"say which job to {verb}: -o OUTPUT or --job ID")
    cfg = _config(config_path, require_keys=False)
    client = connect(_broker(cfg), check=True, master=cfg.sentinel_master)
    return client, Job(client, job_name or job_id_for(output))  # type: ignore[arg-type]


@main.command()
@config_option
@click.option("--job", "job_name", help="The job's id or name.")
@click.option("-o", "--output", help="The job of this output file.")
@click.option("--yes", is_flag=True, help="Do it without asking.")
@friendly
def reset(config_path: str | None, job_name: str | None, output: str | None, yes: bool) -> None:
    """Forget a job's state in Redis (done rows, claims, uncollected results); files stay as they are."""
    from opt_queue.store import keys
    from opt_queue.lanes.chunks import chunk_states

    client, job = _job(config_path, job_name, output, "reset")
    if not job.exists():
        out.print(f"job {job.id} has no state in Redis; nothing to reset")
        return
    p = job.progress()
    uncollected = client.xlen(keys.job_results(job.id))
    live = [c for c, st in chunk_states(client, job.id).items() if st.state not in ("done", "pending")]
    if live:
        out.print(f"{len(live)} batches of this job are at the provider: reset would leave them running (and "
                  f"paid); run `opt-queue cancel` first and `collect` what they answered.")
    out.print(f"job [bold]{job.id}[/] ({p.status}): {p.total} rows, {p.reported} finished, "
              f"{p.outstanding} queued or in flight, {uncollected} finished but not collected.")
    out.print("reset drops its Redis state: the next submit sends every row the output file lacks or "
              "holds as null; tasks still queued are dropped by the workers"
              + (f"; the {uncollected} uncollected answers are lost (run collect first to keep them)"
                 if uncollected else "") + ".")
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("reset needs --yes when it cannot ask (no terminal)")
        click.confirm("reset this job?", abort=True)
    job.delete()
    out.print(f"job {job.id} reset")


@main.command()
@config_option
@click.option("--job", "job_name", help="The job's id or name.")
@click.option("-o", "--output", help="The job of this output file.")
@friendly
def cancel(config_path: str | None, job_name: str | None, output: str | None) -> None:
    """Stop a job everywhere: no new calls, the provider's batches cancelled (what they answered is kept)."""
    from opt_queue.lanes.chunks import wake

    client, job = _job(config_path, job_name, output, "cancel")
    if not job.exists():
        raise ConfigError(f"job {job.id} has no state in Redis; nothing to cancel")
    job.stop("cancelled by the user; the unanswered rows stay unanswered: run the same command again to resume")
    batches = wake(client, job.id)
    out.print(f"job [bold]{job.id}[/] cancelled: workers send nothing more"
              + (f"; {batches} batches are being cancelled at the provider (rows they answered are kept: "
                 f"`opt-queue collect` writes them)" if batches else ""))


@main.command()
@click.option("-d", "--directory", default="opt-queue-demo", show_default=True,
              help="Where the demo writes its data, config and output.")
@click.option("--rows", default=120, show_default=True, help="Rows of the demo dataset to process.")
@click.option("--lane", type=click.Choice(["sync", "flex", "batch"]), default="sync", show_default=True,
              help="The lane the demo's rows take (batch: the simulated Batch API).")
@click.option("--providers", "which", type=click.Choice(["openai", "all"]), default="openai", show_default=True,
              help="all: rows of OpenAI, Claude and Gemini models, each provider's keys and limits "
                   "(needs opt-queue[all]).")
@friendly
def demo(directory: str, rows: int, lane: str, which: str) -> None:
    """Run the whole system against a built-in simulated API, offline, in under a minute."""
    from opt_queue.cli.demo import run_demo

    run_demo(Path(directory), rows, console, out, lane, which)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--key", "keys", multiple=True, help="A key it accepts (repeat; default: sk-sim-key).")
@click.option("--rpm", type=int, help="Requests per minute of every key.")
@click.option("--tpm", type=int, help="Tokens per minute of every key.")
@click.option("--rpd", type=int, help="Requests per day of every key.")
@click.option("--minute", default=60.0, show_default=True, help="Seconds in the simulated minute.")
@click.option("--latency", default=0.0, show_default=True, help="Seconds before each answer.")
@click.option("--errors", "error_rate", default=0.0, show_default=True,
              help="Share of requests answered with a 5xx (0 to 1).")
@click.option("--no-headers", is_flag=True, help="Send no x-ratelimit-* headers (like vLLM or a proxy).")
@click.option("--batch-delay", default=10.0, show_default=True,
              help="Seconds a Batch API batch takes from its creation to its completion.")
@click.option("--batch-enqueued-tokens", type=int, default=0, show_default=True,
              help="Enqueued-token limit per organization and model of the Batch API (0: none).")
@click.option("--token-count", type=click.Choice(TOKEN_COUNTS), default="typical", show_default=True,
              help="How a prompt's tokens are counted, for the rate limits and the usage: typical (4 ASCII "
                   "characters a token, one per other character), chars4 (characters / 4), o200k, cl100k "
                   "(the tokenizers, as OpenAI bills), estimator (opt-queue's own count).")
@click.option("--limit-count", type=click.Choice(TOKEN_COUNTS), help="The same for the rate limits only.")
@click.option("--usage-count", type=click.Choice(TOKEN_COUNTS), help="The same for the usage only.")
@friendly
def sim(host: str, port: int, keys: tuple[str, ...], rpm: int | None, tpm: int | None, rpd: int | None,
        minute: float, latency: float, error_rate: float, no_headers: bool, batch_delay: float,
        batch_enqueued_tokens: int, token_count: str, limit_count: str | None, usage_count: str | None) -> None:
    """Serve the simulated APIs until Ctrl-C, to try opt-queue without paying: OpenAI's (every
    Batch endpoint), Anthropic's Messages API and Gemini's generateContent, on one port; every key
    works on all three. Set api_base to the URL it prints (without /v1 for Anthropic and Gemini keys)."""
    import time

    from opt_queue.sim.api import SimConfig, SimKey, SimServer

    secrets = keys or ("sk-sim-key",)
    config = SimConfig(keys=[SimKey(k, rpm=rpm, tpm=tpm, rpd=rpd) for k in secrets], minute=minute,
                       latency=latency, transient_rate=error_rate, send_headers=not no_headers,
                       batch_delay=batch_delay, batch_enqueued_tokens=batch_enqueued_tokens,
                       limit_count=limit_count or token_count, usage_count=usage_count or token_count)
    try:
        server = SimServer(config, port=port, hosts=(host,)).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    out.print(f"simulated API at [bold]{server.base_url}[/] ({len(secrets)} key(s); Ctrl-C stops it)\n"
              f'config: {{"api_base": "{server.base_url}", "api_keys": {json.dumps(list(secrets))}}}\n'
              f'an Anthropic or Gemini key: {{"key": "...", "provider": "anthropic" or "gemini", '
              f'"api_base": "{server.base_url.removesuffix("/v1")}"}}', highlight=False)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
