"""Exceptions raised by opt-queue.

The tree::

    OptQueueError                    root: the CLI prints one red line and exits non-zero
    +-- ConfigError                  config.json or the environment is wrong (exit 2)
    +-- InputError                   the input file has bad lines (exit 2); carries file and lines
    +-- OutputError                  output.jsonl is not an opt-queue output file (exit 2)
    +-- BrokerError                  Redis cannot be reached or is not usable (exit 3)
    +-- JobStopped                   the job was stopped for good, e.g. every key is retired (exit 4)
    +-- Interrupted                  the user stopped the command (Ctrl-C, SIGTERM): exit 130

A failed API call is not an exception here: ``client.classify`` turns it into a ``Failure`` whose
``Kind`` (rate limited, key dead, transient, too long, job config, bad row) the error policy in
``engine`` acts on. Programmer mistakes raise ``RuntimeError`` or ``ValueError`` as usual.
"""

from __future__ import annotations


class OptQueueError(Exception):
    """Root of every error opt-queue raises on purpose."""

    exit_code = 1


class ConfigError(OptQueueError):
    """The configuration is invalid; the message names the field."""

    exit_code = 2


class InputError(OptQueueError):
    """The input file has problems; ``problems`` lists ``(line, message)`` pairs."""

    exit_code = 2

    def __init__(self, path: str, problems: list[tuple[int, str]], total: int | None = None) -> None:
        self.path = path
        self.problems = problems
        self.total = total if total is not None else len(problems)
        shown = "\n".join(f"  {path}:{line}: {msg}" for line, msg in problems)
        more = self.total - len(problems)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{path} has {self.total} bad line(s); nothing was enqueued. "
            f"Fix them (or pass --skip-bad-lines) and run again:\n{shown}{tail}"
        )


class OutputError(OptQueueError):
    """An existing output file cannot be read as opt-queue output."""

    exit_code = 2


class BrokerError(OptQueueError):
    """Redis is unreachable or refuses the connection."""

    exit_code = 3


class JobStopped(OptQueueError):
    """The job was stopped for good (every key retired, wrong model, ...)."""

    exit_code = 4



class Interrupted(OptQueueError):
    """The user stopped the command (Ctrl-C or SIGTERM); what was answered is kept."""

    exit_code = 130
