"""JSONL in and out, with no Redis and no network: input rows, output state, atomic rewrites.

The input formats and what a row asks for are ``request``'s; the shapes of output lines are
``formats``' (reading here is format-blind: an answer, or null).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from opt_queue.core import formats
from opt_queue.core.errors import InputError, OutputError
from opt_queue.core.request import CHAT_URL, SEED, BadLine, detect, index_number, row_request

MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Row:
    """One valid input row: its position, its index, and the request it asks for."""

    seq: int
    line: int
    index: str
    body: dict[str, Any]
    raw: dict[str, Any]
    url: str = CHAT_URL
    """The endpoint (``/v1/chat/completions`` unless a Batch-format row names another)."""


def _decode_lines(fh: BinaryIO, digest: Any = None) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield ``(line number, text, problem)`` for each non-blank line; handles BOM and CRLF.
    ``digest`` (a hashlib object), when given, is fed every byte of the file."""
    for number, raw in enumerate(fh, 1):
        if digest is not None:
            digest.update(raw)
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            yield number, None, f"not valid UTF-8 (byte {exc.start})"


def iter_input(path: str | os.PathLike[str], *, skip_bad: bool = False,
               bad: list[tuple[int, str]] | None = None, digest: Any = None) -> Iterator[Row]:
    """Stream the rows of an input file.

    A bad line raises :class:`InputError` at once unless ``skip_bad``, in which case it is
    appended to ``bad`` and skipped. Duplicate indices are bad lines too (the first one wins).
    """
    fmt: str | None = None
    seen = IndexSet()
    seq = 0
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(str(path), [(0, f"cannot open: {exc.strerror}")]) from None
    with fh:
        for number, text, problem in _decode_lines(fh, digest):
            try:
                if problem:
                    raise BadLine(problem)
                try:
                    obj = json.loads(text)  # type: ignore[arg-type]
                except json.JSONDecodeError as exc:
                    raise BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise BadLine(f"must be a JSON object, not {type(obj).__name__}")
                fmt = fmt or detect(obj)
                index, url, body = row_request(obj, fmt)
                if not seen.add(index):  # the last check: a bad line's index is not taken
                    raise BadLine(f"index {index!r} appears more than once")
            except BadLine as exc:
                if not skip_bad:
                    raise InputError(str(path), [(number, str(exc))]) from None
                if bad is not None:
                    bad.append((number, str(exc)))
                continue
            yield Row(seq=seq, line=number, index=index, body=body, raw=obj, url=url)
            seq += 1


@dataclass
class InputSummary:
    """What :func:`validate_input` found."""

    rows: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    sha256: str = ""
    """Fingerprint of the file's bytes: the job records which input it was submitted from."""
    format: str = SEED
    """The input format (``request.SEED``, ``CHAT`` or ``BATCH``), from the first row."""


def validate_input(path: str | os.PathLike[str], *, skip_bad: bool = False) -> InputSummary:
    """Read the whole file once; raise :class:`InputError` listing bad lines unless ``skip_bad``."""
    summary = InputSummary()
    digest = hashlib.sha256()
    for row in iter_input(path, skip_bad=True, bad=summary.bad, digest=digest):
        if summary.rows == 0:
            summary.format = detect(row.raw)
        summary.rows += 1
    summary.sha256 = digest.hexdigest()
    if summary.bad and not skip_bad:
        raise InputError(str(path), summary.bad[:MAX_PROBLEMS_SHOWN], total=len(summary.bad))
    if summary.rows == 0 and not summary.bad:
        raise InputError(str(path), [(0, "the file holds no rows")])
    return summary


# --- output ----------------------------------------------------------------------------------


def beside(output: str | os.PathLike[str], suffix: str) -> Path:
    """A file beside the output: ``output.jsonl`` -> ``output<suffix>`` (``.errors.jsonl``, ``.worker.log``)."""
    p = Path(output)
    return p.with_name(p.name[: -len(".jsonl")] + suffix if p.name.endswith(".jsonl") else p.name + suffix)


def errors_path(output: str | os.PathLike[str]) -> Path:
    """``output.errors.jsonl`` beside ``output.jsonl``: why each null is null."""
    return beside(output, ".errors.jsonl")


def finished_path(output: str | os.PathLike[str]) -> Path:
    """``output.finished.json`` beside ``output.jsonl``: what the output was when its collector
    finished it with every row answered (see :func:`finished_rows`)."""
    return beside(output, ".finished.json")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (as :func:`validate_input` reports it), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def mark_finished(input_path: str | os.PathLike[str], input_sha256: str, output: str | os.PathLike[str],
                  rows: int) -> None:
    """Note that ``output`` answers every one of the ``rows`` rows of ``input_path``, whose bytes
    hash to ``input_sha256``, as the output is now (its size and modification time)."""
    st = os.stat(output)
    stamp = {"input": str(Path(input_path).resolve()), "input_sha256": input_sha256, "rows": rows,
             "output_size": st.st_size, "output_mtime_ns": st.st_mtime_ns}
    atomic_write(finished_path(output), iter([json.dumps(stamp) + "\n"]))


def finished_rows(input_path: str | os.PathLike[str] | None, output: str | os.PathLike[str]) -> int | None:
    """The rows of a finished job whose input (``input_path``, else the one it was finished
    for) and output are as its collector left them (the output's size and time, the input's
    SHA-256): a re-run then has nothing to send or to write, and says so without reading a row (a
    hash of the input, ~1 s a GB). None otherwise: the re-run reads both files, as it must to find
    what is missing."""
    try:
        stamp = json.loads(finished_path(output).read_text(encoding="utf-8"))
        st = os.stat(output)
        if (st.st_size, st.st_mtime_ns) != (stamp["output_size"], stamp["output_mtime_ns"]):
            return None
        return int(stamp["rows"]) if file_sha256(input_path or stamp["input"]) == stamp["input_sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class FinalFailure:
    """A null that retrying the same request cannot help (``jobs.RowResult.retryable``)."""

    reason: str
    request: str | None


def final_failures(output: str | os.PathLike[str], nulls: Any) -> dict[str, FinalFailure]:
    """The nulls among ``nulls`` whose last reason in the errors file says that sending the same
    request again cannot help (a context length, a content filter, a schema that the answers kept
    missing), by index. A re-run leaves them null unless their request changed."""
    path = errors_path(output)
    found: dict[str, FinalFailure] = {}
    if not nulls or not path.exists():
        return found
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                entry = _DECODE(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue  # a torn last line
            index = formats.error_index(entry)
            if index is None or index not in nulls or entry.get("warning"):
                continue
            if entry.get("retryable") is False:
                error = entry.get("error")
                reason = entry.get("error_type") or (error.get("code") if isinstance(error, dict) else None)
                found[index] = FinalFailure(str(reason or "unknown"), entry.get("request"))
            else:
                found.pop(index, None)  # a later line says it can be retried
    return found


def check_writable(output: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` unless ``output`` (and the files beside it: errors, lock, state)
    can be written: checked before anything is enqueued or paid for."""
    p = Path(output)
    if p.is_dir():
        raise OutputError(f"{p} is a directory; give -o a file name such as {p / 'output.jsonl'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the directory {p.parent} for {p.name} ({exc.strerror}); "
                          f"choose another -o or fix its permissions") from None
    try:  # a real write (mode bits say nothing to root, nor about read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: the directory {p.parent} is not writable ({exc.strerror}); "
                          f"choose another -o or fix its permissions") from None
    if p.exists():
        try:
            open(p, "ab").close()
        except OSError as exc:
            raise OutputError(f"cannot write {p} ({exc.strerror}); fix its permissions (chmod u+w {p})") from None


_DECODE = json.JSONDecoder().decode


def _parse_output_line(path: Path, number: int, raw: bytes) -> tuple[str, Any]:
    try:
        obj = _DECODE(raw.decode("utf-8-sig"))  # json.loads(bytes) spends a third again guessing
    except (ValueError, UnicodeDecodeError):
        obj = None
    parsed = formats.parse(obj)
    if parsed is None:
        raise OutputError(f"{path}:{number}: this line is not an opt-queue output line "
                          f'({{"<index>": "answer"}} or a Batch-format line); is {path} the right output file?')
    return parsed


def output_format(path: str | os.PathLike[str], lines: int = 1000) -> str | None:
    """The format of an existing output file (``formats``), from its first line that shows it (a
    null of the seed and full formats does not), among its first ``lines``; None when none does."""
    p = Path(path)
    if not p.exists():
        return None
    with open(p, "rb") as fh:
        for number, raw in enumerate(fh):
            if number >= lines:
                break
            if raw.strip():
                try:
                    found = formats.format_of(_DECODE(raw.decode("utf-8-sig")))
                except (ValueError, UnicodeDecodeError):
                    return None
                if found is not None:
                    return found
    return None


def repair_tail(path: str | os.PathLike[str]) -> int:
    """Cut a half-written last line (a crash mid-write); return how many bytes were removed."""
    p = Path(path)
    if not p.exists():
        return 0
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        back = min(size, 1 << 16)
        while True:
            fh.seek(size - back)
            chunk = fh.read(back)
            cut = chunk.rfind(b"\n")
            if cut >= 0 or back == size:
                keep = size - back + cut + 1 if cut >= 0 else 0
                break
            back = min(size, back * 4)
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep




class IndexSet:
    """A set of row indices that costs one bit for a small decimal index ("0", "17": the usual
    case, up to 2**24) and a string for any other, so a million-row job's sets take kilobytes."""

    __slots__ = ("_bits", "_count", "_other")

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._bits = bytearray()
        self._other: set[str] = set()
        self._count = 0
        for index in items:
            self.add(index)

    _number = staticmethod(index_number)

    def add(self, index: str) -> bool:
        """Add ``index``; return whether it was new."""
        n = self._number(index)
        if n is None:
            if index in self._other:
                return False
            self._other.add(index)
            self._count += 1
            return True
        return self._add_number(n)

    def _add_number(self, n: int) -> bool:
        byte, bit = divmod(n, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1, 2 * len(self._bits)) - len(self._bits)))
        if self._bits[byte] >> bit & 1:
            return False
        self._bits[byte] |= 1 << bit
        self._count += 1
        return True

    def discard(self, index: str) -> None:
        n = self._number(index)
        if n is None:
            if index in self._other:
                self._other.discard(index)
                self._count -= 1
            return
        byte, bit = divmod(n, 8)
        if byte < len(self._bits) and self._bits[byte] >> bit & 1:
            self._bits[byte] &= ~(1 << bit) & 0xFF
            self._count -= 1

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, str):
            return False
        n = self._number(index)
        if n is None:
            return index in self._other
        byte, bit = divmod(n, 8)
        return byte < len(self._bits) and bool(self._bits[byte] >> bit & 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        for byte, value in enumerate(self._bits):
            if value:
                for bit in range(8):
                    if value >> bit & 1:
                        yield str(8 * byte + bit)
        yield from self._other

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (IndexSet, set, frozenset)):
            return len(self) == len(other) and all(i in self for i in other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"<IndexSet of {self._count}>"


class IndexList:
    """The indices of an input in order, 4 bytes each for small decimal indices (their numbers in
    an array) and a string for any other: a 10-million-row input's order takes 40 MB, not the
    ~600 MB of a list of strings."""

    __slots__ = ("_numbers", "_other")

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._numbers = array("i")  # -1: the next string of _other
        self._other: list[str] = []
        for index in items:
            self.append(index)

    def append(self, index: str) -> None:
        n = index_number(index)
        if n is None:
            self._numbers.append(-1)
            self._other.append(index)
        else:
            self._numbers.append(n)

    def __len__(self) -> int:
        return len(self._numbers)

    def __iter__(self) -> Iterator[str]:
        other = iter(self._other)
        for n in self._numbers:
            yield next(other) if n < 0 else str(n)

    # By number, without a string of each index: a collector's passes over a 10-million-row order.
    def as_set(self) -> IndexSet:
        """The indices as an :class:`IndexSet`."""
        found = IndexSet()
        other = iter(self._other)
        for n in self._numbers:
            if n < 0:
                found.add(next(other))
            else:
                found._add_number(n)
        return found

    def count_in(self, found: IndexSet) -> int:
        """How many of the indices ``found`` holds (a repeated index counts each time)."""
        bits, other, count = found._bits, iter(self._other), 0
        limit = 8 * len(bits)
        for n in self._numbers:
            if n < 0:
                count += next(other) in found
            elif n < limit and bits[n >> 3] >> (n & 7) & 1:
                count += 1
        return count


class LinePlaces:
    """Where each index's line lives in a file, ``index -> (offset, length)``: 12 bytes a small
    decimal index (two arrays by its number, as :class:`IndexSet` keeps its bits), a dict entry for
    any other. A 10-million-row output's places take 120 MB, not the 2-3 GB of a dict."""

    __slots__ = ("_at", "_length", "_other")

    def __init__(self) -> None:
        self._at = array("q")  # offset + 1; 0: no line
        self._length = array("I")  # a line of 4 GiB or more is not an answer
        self._other: dict[str, tuple[int, int]] = {}

    def __setitem__(self, index: str, place: tuple[int, int]) -> None:
        n = index_number(index)
        if n is None:
            self._other[index] = place
            return
        if n >= len(self._at):
            grow = max(n + 1, 2 * len(self._at)) - len(self._at)
            self._at.frombytes(bytes(grow * self._at.itemsize))
            self._length.frombytes(bytes(grow * self._length.itemsize))
        self._at[n] = place[0] + 1
        self._length[n] = place[1]

    def get(self, index: str) -> tuple[int, int] | None:
        n = index_number(index)
        if n is None:
            return self._other.get(index)
        if n >= len(self._at) or not self._at[n]:
            return None
        return self._at[n] - 1, self._length[n]


@dataclass
class OutputState:
    """Which indices an output file answers, which are null, and (when asked for) where each
    line lives."""

    answered: IndexSet = field(default_factory=IndexSet)
    nulls: IndexSet = field(default_factory=IndexSet)
    offsets: LinePlaces | None = field(default_factory=LinePlaces)
    end: int = 0
    """Bytes of the file read so far (up to its last complete line)."""
    inode: int | None = None
    """The file read: a rewrite (temp file + rename) is another file, read again from its start."""

    def has(self, index: str) -> bool:
        return index in self.answered or index in self.nulls

    def record(self, index: str, answer: Any, offset: int = -1, length: int = 0) -> bool:
        """Note one line; return False when it adds nothing (the index is already answered)."""
        if answer is None:
            if index in self.answered or not self.nulls.add(index):
                return False
        else:
            if not self.answered.add(index):
                return False
            if self.nulls:
                self.nulls.discard(index)
        if self.offsets is not None:
            self.offsets[index] = (offset, length)
        return True


def read_output(path: str | os.PathLike[str], *, repair: bool = True, offsets: bool = True) -> OutputState:
    """Read an output file (missing means empty). An answer beats a null for the same index.

    Without ``offsets`` (the producer's case) no per-line position is kept, so the memory stays
    that of two :class:`IndexSet`.
    """
    p = Path(path)
    state = OutputState(offsets=LinePlaces() if offsets else None)
    if not p.exists():
        return state
    if repair:
        repair_tail(p)
    _read_lines(p, state, whole=True)
    return state


def _read_lines(p: Path, state: OutputState, whole: bool = False) -> None:
    """Record the lines of ``p`` from ``state.end`` on. Unless ``whole``, a last line with no
    newline yet (a collector is writing it) is left for the next read."""
    with open(p, "rb") as fh:
        state.inode = os.fstat(fh.fileno()).st_ino
        fh.seek(state.end)
        offset = state.end
        for number, raw in enumerate(fh, 1):
            if not whole and not raw.endswith(b"\n"):
                break
            length = len(raw)
            if raw.strip():
                index, answer = _parse_output_line(p, number, raw)
                state.record(index, answer, offset, length)
            offset += length
        state.end = offset


def catch_up(path: str | os.PathLike[str], state: OutputState) -> OutputState:
    """Bring ``state`` (from :func:`read_output`) up to date with the lines a collector appended
    to ``path`` since; a file rewritten meanwhile is read again whole. Returns the state."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return state
    if st.st_ino != state.inode or st.st_size < state.end:
        fresh = OutputState(offsets=LinePlaces() if state.offsets is not None else None)
        _read_lines(p, fresh)
        return fresh
    if st.st_size > state.end:
        _read_lines(p, state)
    return state


def atomic_write(path: str | os.PathLike[str], lines: Iterator[str] | Iterator[bytes],
                 binary: bool = False) -> None:
    """Write ``lines`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent or ".")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            for line in lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_output(output: str | os.PathLike[str], order: Iterator[str],
                   state: OutputState | None = None) -> tuple[int, int]:
    """Rewrite ``output`` with one line per index of ``order``, taken from its current lines
    (``state``: as :func:`read_output` with places just read them).

    Returns ``(lines written, indices missing)``; missing indices are left out. Its memory is the
    places of the lines (:class:`LinePlaces`), never a line's text or a map of strings.
    """
    if state is None or state.offsets is None:
        state = read_output(output)
    offsets = state.offsets if state.offsets is not None else LinePlaces()
    written = missing = 0

    def lines() -> Iterator[bytes]:
        nonlocal written, missing
        for _index, line in placed_lines(output, order, offsets):
            if line is None:
                missing += 1
                continue
            written += 1
            yield line

    atomic_write(output, lines(), binary=True)
    return written, missing


def placed_lines(path: str | os.PathLike[str], order: Iterable[str],
                 places: LinePlaces) -> Iterator[tuple[str, bytes | None]]:
    """Each index of ``order`` with its line of ``path`` (read where ``places`` says it lies), or
    None where it has none: a file's lines in another order, one line in memory at a time."""
    with open(path, "rb") as src:
        for index in order:
            where = places.get(index)
            if where is None:
                yield index, None
                continue
            src.seek(where[0])
            yield index, src.read(where[1])


def merge(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
          merged_path: str | os.PathLike[str]) -> int:
    """Write the input rows, each with its ``"output"``, as one JSON array (indent 4)."""
    answers: dict[str, Any] = {}
    p = Path(output_path)
    if p.exists():
        with open(p, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if raw.strip():
                    index, answer = _parse_output_line(p, number, raw)
                    if answer is not None or index not in answers:
                        answers[index] = answer
    count = 0

    def chunks() -> Iterator[str]:
        nonlocal count
        yield "["
        for row in iter_input(input_path, skip_bad=True):
            item = dict(row.raw)
            if "index" in item:
                item["index"] = row.index
            item["output"] = answers.get(row.index)
            text = json.dumps(item, ensure_ascii=False, indent=4)
            yield ("\n" if count == 0 else ",\n") + "    " + text.replace("\n", "\n    ")
            count += 1
        yield "\n]\n" if count else "]\n"

    atomic_write(merged_path, chunks())
    return count
