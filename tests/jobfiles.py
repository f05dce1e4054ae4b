"""A job whose every row is already in its output, as the collector finds it at its final rewrite:
for the rewrite's memory test and ``bench/collector_memory.py``."""

from __future__ import annotations

import json
import random
from pathlib import Path


def answered_out_of_order(work: Path, rows: int, warn_every: int = 4) -> tuple[Path, Path, set[int]]:
    """Write ``data.jsonl`` (seed-format rows ``0..rows-1``), ``output.jsonl`` answering every row
    out of input order (the first 500 of that order first as nulls, later answered, and one row
    answered twice) and ``output.errors.jsonl`` (the nulls' reasons, and a warning for every
    ``warn_every``-th row of that order; 0: none). Return the two paths and the warned rows."""
    data, out = work / "data.jsonl", work / "output.jsonl"
    with open(data, "w") as fh:
        for i in range(rows):
            fh.write(f'{{"index": {i}, "instruction": "t", "input": "row {i}"}}\n')
    order = list(range(rows))
    random.Random(7).shuffle(order)
    with open(out, "w") as fh:
        for i in order[:500]:
            fh.write(json.dumps({str(i): None}) + "\n")  # a null, later answered
        for i in order:
            fh.write(json.dumps({str(i): f"answer {i}"}) + "\n")
        fh.write(json.dumps({str(order[0]): "a second answer, not kept"}) + "\n")
    warned = set(order[::warn_every]) if warn_every else set()  # answers cut at their token limit
    with open(work / "output.errors.jsonl", "w") as fh:
        for i in order[:500]:
            fh.write(json.dumps({"index": str(i), "error_type": "timeout", "message": "m", "attempts": 3}) + "\n")
        for i in warned:
            fh.write(json.dumps({"index": str(i), "error_type": "finish_reason_length", "warning": True,
                                 "message": "the answer was cut at its token limit"}) + "\n")
    return data, out, warned
