"""Input reading, output state, crash repair and rewrites: pure file I/O, no servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opt_queue.jobflow.dataset import (IndexList, IndexSet, iter_input, merge, read_output, repair_tail, rewrite_output,
                               validate_input)
from opt_queue.core.errors import InputError, OutputError


def test_seed_rows_become_system_and_user_messages_and_int_index_becomes_string(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text('{"index": "0", "instruction": "把这句话翻译成英文", "input": "今天天气真好"}\n'
                 '{"index": 1, "instruction": "", "input": "hi"}\n', encoding="utf-8")
    rows = list(iter_input(p))
    assert rows[0].body["messages"] == [{"role": "system", "content": "把这句话翻译成英文"},
                                        {"role": "user", "content": "今天天气真好"}]
    assert rows[1].index == "1" and rows[1].body["messages"] == [{"role": "user", "content": "hi"}]


def test_chat_and_batch_formats_keep_their_request_parameters(tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"index": "7", "messages": [{"role": "user", "content": "x"}],
                                "temperature": 0, "max_tokens": 5}) + "\n")
    (row,) = iter_input(chat)
    assert row.index == "7" and row.body == {"messages": [{"role": "user", "content": "x"}],
                                             "temperature": 0, "max_tokens": 5}
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"custom_id": "row-1", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "y"}]}}) + "\n")
    (row,) = iter_input(batch)
    assert row.index == "row-1" and row.body["model"] == "gpt-4o-mini"


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"index": "a", "input": "x"}\r\n\r\n   \n{"index": "b", "input": "y"}\r\n')
    assert [r.index for r in iter_input(p)] == ["a", "b"]
    assert [r.line for r in iter_input(p)] == [1, 4]


@pytest.mark.parametrize("content, line, words", [
    ('{"index": "0", "input": "a"}\n{"index": "1", "input": \n', 2, "not valid JSON"),
    ('{"index": "0", "input": "a"}\n{"index": "0", "input": "b"}\n', 2, "more than once"),
    ('{"index": "0", "input": "a"}\n{"input": "b"}\n', 2, 'missing "index"'),
    ('{"index": true, "input": "a"}\n', 1, "must be a string"),
    ('{"index": "0", "input": 5}\n', 1, '"input" must be a string'),
    ('[1, 2]\n', 1, "must be a JSON object"),
    ('{"index": "0", "messages": []}\n', 1, "non-empty list"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/embeddings", "body": {}}\n', 1, "POST"),
])
def test_bad_lines_are_reported_with_file_and_line(tmp_path: Path, content: str, line: int, words: str) -> None:
    p = tmp_path / "data.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as err:
        validate_input(p)
    assert f"data.jsonl:{line}:" in str(err.value) and words in str(err.value)
    assert "nothing was enqueued" in str(err.value)


def test_invalid_utf8_names_the_line_and_every_bad_line_is_listed(tmp_path: Path) -> None:
    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"index": "0", "input": "a"}\n{"index": "1", "input": "\xff"}\nnot json\n')
    with pytest.raises(InputError) as err:
        validate_input(p)
    assert err.value.total == 2 and [line for line, _ in err.value.problems] == [2, 3]
    assert "UTF-8" in str(err.value)


def test_skip_bad_keeps_the_good_rows(tmp_path: Path) -> None:
    p = tmp_path / "data.jsonl"
    p.write_text('{"index": "0", "input": "a"}\nbroken\n{"index": "2", "input": "c"}\n')
    summary = validate_input(p, skip_bad=True)
    assert summary.rows == 2 and summary.bad[0][0] == 2


def test_large_row_is_read_whole(tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    big = "字" * (10 * 1024 * 1024 // 3)
    p.write_text(json.dumps({"index": "0", "input": big}, ensure_ascii=False) + "\n", encoding="utf-8")
    (row,) = iter_input(p)
    assert row.body["messages"][-1]["content"] == big


def test_output_state_answer_beats_null_and_torn_tail_is_cut(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text('{"0": null}\n{"1": "one"}\n{"0": "zero"}\n{"2": "tw', encoding="utf-8")
    state = read_output(p)
    assert state.answered == {"0", "1"} and not state.nulls
    assert p.read_text().endswith('{"0": "zero"}\n')
    assert repair_tail(p) == 0


def test_output_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text('{"index": "0", "instruction": "x"}\n')
    with pytest.raises(OutputError, match="out.jsonl:1"):
        read_output(p)


def test_rewrite_keeps_one_line_per_row_in_input_order(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text('{"2": "c"}\n{"0": null}\n{"1": "b"}\n{"0": "a"}\n{"9": "stale"}\n', encoding="utf-8")
    assert rewrite_output(p, iter(["0", "1", "2", "3"])) == (3, 1)
    assert p.read_text() == '{"0": "a"}\n{"1": "b"}\n{"2": "c"}\n'


def test_merge_writes_the_seed_array_format(tmp_path: Path) -> None:
    inp, outp, merged = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "m.json"
    inp.write_text('{"index": 0, "instruction": "写一句话", "input": ""}\n{"index": "1", "input": "x"}\n',
                   encoding="utf-8")
    outp.write_text('{"0": "你好"}\n{"1": null}\n', encoding="utf-8")
    assert merge(inp, outp, merged) == 2
    text = merged.read_text(encoding="utf-8")
    assert json.loads(text) == [{"index": "0", "instruction": "写一句话", "input": "", "output": "你好"},
                                {"index": "1", "input": "x", "output": None}]
    assert "你好" in text and '\n    {\n        "index": "0",' in text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                          st.builds(lambda i, s: json.dumps({"index": i, "input": s}).encode(),
                                    st.one_of(st.text(max_size=5), st.integers(), st.booleans()),
                                    st.text(max_size=10))), max_size=12))
def test_reader_never_crashes_on_arbitrary_bytes(tmp_path: Path, lines: list[bytes]) -> None:
    """Fuzz: any file either validates or raises InputError naming lines; never another exception."""
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        summary = validate_input(p)
    except InputError as exc:
        assert exc.problems and all(isinstance(n, int) for n, _ in exc.problems)
    else:
        indices = [r.index for r in iter_input(p)]
        assert len(indices) == summary.rows == len(set(indices))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.one_of(
    st.integers(0, 5000).map(str), st.integers(2**24 - 3, 2**24 + 3).map(str),
    st.sampled_from(["007", "00", "-1", "1e3", "a", "", "٣", "12 "]), st.text(max_size=4)))))
def test_index_set_behaves_like_a_set_of_strings(ops: list[tuple[bool, str]]) -> None:
    compact, model = IndexSet(), set()
    for add, index in ops:
        if add:
            compact.add(index)
            model.add(index)
        else:
            compact.discard(index)
            model.discard(index)
        assert len(compact) == len(model)
    assert sorted(compact) == sorted(model)
    assert all(i in compact for i in model)
    assert all((i in compact) == (i in model) for _, i in ops)
    # an input's order (repeats kept) against the set, by number: as the collector counts
    order = IndexList(i for _, i in ops)
    assert list(order) == [i for _, i in ops]
    assert order.count_in(compact) == sum(i in model for _, i in ops)
    assert order.as_set() == {i for _, i in ops} and len(order.as_set()) == len({i for _, i in ops})


def test_the_collectors_final_rewrite_keeps_no_per_row_map(tmp_path: Path, rclient: Any) -> None:
    """200,000 rows whose lines arrived out of order (nulls later answered, a line twice), a
    quarter with a warning in output.errors.jsonl, are rewritten in input order with at most ~50 bytes of
    Python memory a row (a dict of line places, a list of the input's indices, an output state
    with places or the errors' lines by index cost 150-450)."""
    import tracemalloc

    from jobfiles import answered_out_of_order

    from opt_queue.jobflow.collector import Collector
    from opt_queue.store.jobs import Job

    rows = 200_000
    data, out, cut = answered_out_of_order(tmp_path, rows)  # a quarter with a warning each
    job = Job(rclient, "memory-bound")
    job.begin_submit(total=rows, input=str(data))
    job.end_submit()
    tracemalloc.start()
    try:
        status = Collector(rclient, job.id, out, data).run()
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status.complete and status.answered == rows and status.nulls == 0
    with open(out) as fh:
        first = [next(iter(json.loads(fh.readline()))) for _ in range(3)]
        assert first == ["0", "1", "2"]
        assert sum(1 for _ in fh) == rows - 3
    assert read_output(out).answered == IndexSet(str(i) for i in range(rows))
    with open(tmp_path / "output.errors.jsonl") as fh:  # the warnings kept, in input order; the nulls' gone
        assert [json.loads(line)["index"] for line in fh] == [str(i) for i in range(rows) if i in cut]
    assert status.warnings == {"finish_reason_length": len(cut)} and not status.null_reasons
    assert peak <= 50 * rows, f"{peak / rows:.0f} bytes a row at the final rewrite"
