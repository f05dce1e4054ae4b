"""Terminal output: progress bars while submitting and collecting, summaries, status tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from opt_queue.jobflow.collector import CollectStatus, errors_path
from opt_queue.core.config import Config
from opt_queue.core.prices import money


class _Progress(Progress):
    """Progress bars with free text lines below them (rates, keys), which never squeeze the bars."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        self.lines: dict[str, str] = {}  # before super(): its live display may render at once
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Any:
        yield self.make_tasks_table(self.tasks)
        for line in self.lines.values():
            yield Text(line, no_wrap=True, overflow="ellipsis")


class Display:
    """One live display: a submit bar, a collect bar with rates, and a line about the keys."""

    def __init__(self, console: Console, collect_label: str = "collect") -> None:
        self.collect_label = collect_label
        self.progress = _Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=30),
                                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=console, transient=False, refresh_per_second=4)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _task(self, name: str, total: int) -> TaskID:
        if name not in self._tasks:
            label = self.collect_label if name == "collect" else name
            self._tasks[name] = self.progress.add_task(label, total=total)
        return self._tasks[name]

    def submitted(self, done: int, total: int) -> None:
        """Rows of the input validated and enqueued (or skipped) so far."""
        self.progress.update(self._task("submit", total), completed=done, total=total)

    def waiting(self, outstanding: int) -> None:
        """Submit is holding back: the job already has ``max_queued`` rows in Redis
        (``batch_max_queued`` in the batch lane)."""
        self.progress.lines["wait"] = (f"  waiting for room: {outstanding} rows queued, in flight or in batches "
                                       f"(max_queued, batch_max_queued); workers take them as keys allow")

    def collected(self, status: CollectStatus) -> None:
        """Rows finished (answered + null), with nulls, rate, rows in flight and the keys' state."""
        p = status.progress
        self.progress.update(self._task("collect", status.total), completed=status.total - status.remaining,
                             total=status.total)
        flight = f" · in flight {p.outstanding}" if p else ""
        self.progress.lines["rows"] = (f"  rows: {status.answered} answered · {status.nulls} null · "
                                       f"{status.remaining} remaining · {status.rate:.1f} rows/s{flight}")
        if p is not None and p.count("calls"):
            self.progress.lines["spend"] = "  spend: " + spend_summary(p.spend)
        if status.keys:
            self.progress.lines["keys"] = "  keys: " + keys_summary(status.keys)


def spend_summary(spend: dict[str, Any]) -> str:
    """``$0.42 spent, projected $1.10 · budget $5.00 · tokens 12000 in (3000 cached) + 4000 out (1000
    reasoning)``."""
    text = f"{money(spend['cost'])} spent"
    if spend["projected_cost"] is not None:
        text += f", projected {money(spend['projected_cost'])}"
    if spend["unpriced_calls"]:
        text += f" ({spend['unpriced_calls']} calls of models without a price: not counted)"
    if spend["max_cost"]:
        text += f" · budget {money(spend['max_cost'])}"
    if spend["max_tokens_total"]:
        text += f" · budget {spend['max_tokens_total']} tokens"
    return (text + f" · tokens {spend['input_tokens']} in ({spend['cached_tokens']} cached) + "
            f"{spend['output_tokens']} out ({spend['reasoning_tokens']} reasoning)")


def keys_summary(keys: list[dict[str, Any]]) -> str:
    """One line about the keys: how many are usable, cooling, retired, and their current usage."""
    retired = sum(1 for k in keys if k["retired"])
    cooling = sum(1 for k in keys if k["cooldown_s"] and not k["retired"])
    windows: dict[str, int] = {}
    for k in keys:
        for name, used in k["usage"].items():
            windows[name] = windows.get(name, 0) + used
    usage = ", ".join(f"{v} {n}" for n, v in windows.items())
    return f"{len(keys) - retired - cooling} ready, {cooling} cooling, {retired} retired · now: {usage}"


def print_summary(console: Console, status: CollectStatus, output: str | Path, errors: Path,
                  worker_log: Path | None = None) -> None:
    """One paragraph: where the output is, what is in it, tokens used, why rows are null."""
    p = status.progress
    tokens = f"; tokens used: {p.prompt_tokens} prompt + {p.completion_tokens} completion" if p else ""
    if status.complete:
        console.print(f"[green]done[/]: {output} has {status.total} rows: {status.answered} answered, "
                      f"{status.nulls} null{tokens}.")
    else:
        console.print(f"[yellow]incomplete[/]: {status.total - status.remaining} of {status.total} rows "
                      f"have a result in {output}; {status.remaining} have none yet{tokens}. "
                      f"Run submit (or run) again to enqueue them.")
    if status.null_reasons:
        reasons = ", ".join(f"{n} {why}" for why, n in status.null_reasons.most_common())
        console.print(f"null rows by reason: {reasons} (details in {errors}); "
                      f"running the same command again retries them.")
    if status.warnings:
        console.print(f"{status.warnings.total()} answers were cut at the token limit (finish_reason "
                      f"length): listed in {errors} with \"warning\": true; raise max_tokens and null them "
                      f"to ask again.")
    if p is not None and p.count("calls"):
        console.print(f"spend: {spend_summary(p.spend)}.")
    if p is not None and p.count("cache_hits"):
        console.print(f"the response cache answered {p.count('cache_hits')} rows without a call, saving "
                      f"{money(p.spend['cache_saved'])}.")
    if worker_log is not None and Path(worker_log).exists():
        console.print(f"worker log: {worker_log}")


WIDE = 140
"""Terminal columns from which ``status`` shows its wide tables (every counter); below, compact ones."""


def status_tables(snap: dict[str, Any], width: int = WIDE) -> list[Table]:
    """Render ``status.snapshot()`` as a jobs table and a keys table: compact below :data:`WIDE`
    columns (they fit 80), every counter from there on."""
    if width < WIDE:
        return _compact_tables(snap)
    jobs = Table(title="jobs")
    for col in ("job", "status", "total", "finished", "null", "queued/in flight", "tokens in/cached/out/reasoning",
                "cost (projected, budget)", "note"):
        jobs.add_column(col, no_wrap=col == "job")
    for j in snap["jobs"]:
        note = j["reason"] or ("submitting" if j["submitting"] else "")
        s = j["spend"]
        notes = [f"projected {money(s['projected_cost'])}" if s["projected_cost"] is not None else "",
                 f"budget {money(s['max_cost'])}" if s["max_cost"] else ""]
        cost = money(s["cost"]) + (f" ({', '.join(n for n in notes if n)})" if any(notes) else "")
        jobs.add_row(j["job"], j["status"], str(j["total"]), str(j["finished"]), str(j["nulls"]),
                     str(j["in_flight_or_queued"]), _tokens_cell(s), cost, note)
    ks = Table(title="keys")
    for col in ("key", "provider", "model", "limits (source, last read)", "in current windows", "cooldown",
                "requests", "tokens in/cached/out/reasoning", "cost", "429s", "retired"):
        ks.add_column(col, no_wrap=col == "key")
    for k in snap["keys"]:
        counters = (str(k["requests"]), _tokens_cell(k["spend"]), money(k["spend"]["cost"]), str(k["rate_limited"]),
                    k["retired"] or "")
        provider = k.get("provider", "openai")
        if not k["models"]:
            ks.add_row(k["key"], provider, "", k["limits"] + " (no request yet)", "", "", *counters)
        for i, m in enumerate(k["models"]):
            shown = [w for w in m["windows"] if w["mode"] != "paced" or w["limit"]]
            limits = "; ".join(_limit_cell(w) for w in shown)
            if m.get("token_factor"):
                limits += f"; the server counts prompts x{m['token_factor']:.2f} of opt-queue's count"
            usage = ", ".join(f"{w['used']} {w['dim']}/{w['period']:g}s" for w in shown)
            ks.add_row(k["key"] if i == 0 else "", provider if i == 0 else "", m["model"], limits, usage,
                       f"{m['cooldown_s']}s" if m["cooldown_s"] else "", *(counters if i == 0 else ("",) * 5))
    tables = [jobs, ks]
    chunks = [(j["job"], b) for j in snap["jobs"] for b in j.get("batches") or []]
    if chunks:
        bt = Table(title="batches (batch lane)")
        for col in ("job", "chunk", "rows", "state", "provider batch", "status", "key", "answered", "null",
                    "sent on"):
            bt.add_column(col, no_wrap=col in ("job", "provider batch"))
        for job, b in chunks:
            bt.add_row(job, b["chunk"], str(b["rows"]), b["state"], b["batch"] or "", b["status"] or "",
                       b["key"] or "", str(b["answered"]), str(b["nulls"]), str(b["moved_on"] or ""))
        tables.append(bt)
    return tables


def _compact_tables(snap: dict[str, Any]) -> list[Table]:
    """The tables of :func:`status_tables` in 80 columns: progress, cost and each key's state."""
    jobs = Table(title="jobs", expand=False)
    for col in ("job", "status", "done/total", "null", "queued", "cost"):
        jobs.add_column(col, no_wrap=True, overflow="ellipsis", max_width=30 if col == "job" else None)
    notes = []
    for j in snap["jobs"]:
        s = j["spend"]
        jobs.add_row(j["job"], j["status"], f"{j['finished']}/{j['total']}", str(j["nulls"]),
                     str(j["in_flight_or_queued"]), money(s["cost"]))
        note = j["reason"] or ("submitting" if j["submitting"] else "")
        if note:
            notes.append(f"{j['job']}: {note}")
    ks = Table(title="keys", expand=False)
    for col in ("key", "model", "limits", "used now", "429s", "state"):
        ks.add_column(col, no_wrap=col in ("key", "429s"), overflow="fold")
    for k in snap["keys"]:
        state = "retired" if k["retired"] else (f"cooling {k['cooldown_s']}s" if k["cooldown_s"] else "ready")
        name = k["key"] if k.get("provider", "openai") == "openai" else f"{k['key']} ({k['provider']})"
        if not k["models"]:
            ks.add_row(name, "", k["limits"], "", str(k["rate_limited"]), state)
        for i, m in enumerate(k["models"]):
            shown = [w for w in m["windows"] if w["mode"] != "paced" or w["limit"]]
            limits = ", ".join(f"{w['limit'] or '?'}/{w['period']:g}s {w['dim']}"
                               for w in shown)
            used = ", ".join(str(w["used"]) for w in shown)
            ks.add_row(name if i == 0 else "", m["model"], limits, used,
                       str(k["rate_limited"]) if i == 0 else "", state if i == 0 else "")
    tables: list[Any] = [jobs, ks]
    if notes:
        tables.append(Text("\n".join(notes)))
    retired = [f"{k['key']}: {k['retired']}" for k in snap["keys"] if k["retired"]]
    if retired:
        tables.append(Text("retired: " + "; ".join(retired)))
    chunks = [(j["job"], b) for j in snap["jobs"] for b in j.get("batches") or []]
    if chunks:
        bt = Table(title="batches (batch lane)")
        for col in ("chunk", "rows", "state", "status", "answered", "null"):
            bt.add_column(col, no_wrap=True)
        for _job, b in chunks:
            bt.add_row(b["chunk"], str(b["rows"]), b["state"], b["status"] or "", str(b["answered"]),
                       str(b["nulls"]))
        tables.append(bt)
    tables.append(Text("(a wider terminal shows every counter; --json gives them all)", style="dim"))
    return tables


def _tokens_cell(spend: dict[str, Any]) -> str:
    return (f"{spend['input_tokens']}/{spend['cached_tokens']}/{spend['output_tokens']}/"
            f"{spend['reasoning_tokens']}")


def _limit_cell(w: dict[str, Any]) -> str:
    unit = w["dim"]
    limit = f"{w['limit']}/{w['period']:g}s {unit}" if w["limit"] else f"? {unit}/{w['period']:g}s"
    read = f", {w['read_s_ago']:g}s ago" if w["read_s_ago"] is not None else ""
    return f"{limit} ({w['source']}{read})"


def run_and_report(console: Console, out: Console, input_path: str, output: str, cfg: Config,
                   config_path: str | None, job_name: str | None, workers: int, skip_bad: bool) -> CollectStatus:
    """`run`: the job on this machine, its progress on ``console`` and its summary on ``out``."""
    from opt_queue.jobflow.runner import run_job  # the workers' machinery, for the one command that runs them

    with Display(console) as display:
        result = run_job(input_path, output, cfg, config_path=config_path, job_name=job_name,
                         workers=workers, skip_bad=skip_bad, on_submit=display.submitted,
                         on_progress=display.collected)
    report = result.submitted
    if report.failed_kept or report.copies or report.repeats_sent:
        out.print(f"submit: {report.describe()}", highlight=False)
    print_summary(out, result.collected, output, errors_path(output), result.worker_log)
    return result.collected
