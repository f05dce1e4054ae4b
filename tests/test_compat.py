"""The original toolkit's README examples, run as written except for the import line."""

from __future__ import annotations

import ast
import textwrap
import time
from pathlib import Path

from conftest import TEST_KEY, kill_group, read_jsonl, seed_rows, wait_for, write_config, write_jsonl
import subprocess
import sys
import os

from opt_queue.sim.api import SimServer, sim_answer

MODEL = "gpt-3.5-turbo-0613"


def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body), encoding="utf-8")
    return p


def python(path: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path)], cwd=path.parent, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_dataset_example_runs_resumes_after_interruption_and_merges(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(latency=0.05)
    write_config(tmp_path / "config.json", sim)
    write_jsonl(tmp_path / "data.jsonl", seed_rows(200))
    example = script(tmp_path, "example1.py", """
        from opt_queue import ParallelToolkit

        if __name__ == '__main__':
            tool = ParallelToolkit(config_path="config.json",
                                   input_path="data.jsonl",
                                   output_path="output.jsonl")
            tool.run()
            # 如果你想要合并文件，可以在处理完成后调用
            tool.merge("merged.json")
        """)
    out = tmp_path / "output.jsonl"
    first = subprocess.Popen([sys.executable, str(example)], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: out.exists() and sum(1 for _ in open(out, "rb")) >= 40, what="40 rows on disk")
    kill_group(first)
    time.sleep(0.5)

    second = python(example)

    assert second.returncode == 0, second.stderr
    assert "ParallelToolkit Progress" in second.stderr and "200 answered, 0 null" in second.stderr
    lines = read_jsonl(out)
    assert [next(iter(line)) for line in lines] == [str(i) for i in range(200)]
    merged = __import__("json").loads((tmp_path / "merged.json").read_text(encoding="utf-8"))
    assert merged[5] == {"index": "5", "instruction": "Translate to English", "input": "第 5 行 ✓",
                         "output": sim_answer(MODEL, [{"role": "system", "content": "Translate to English"},
                                                      {"role": "user", "content": "第 5 行 ✓"}])}
    assert max(sim.stats()["per_prompt"].values()) <= 2


def test_parallel_api_and_api_examples_keep_ids_and_pass_model_parameters(tmp_path: Path, sim: SimServer) -> None:
    write_config(tmp_path / "config.json", sim)
    example = script(tmp_path, "example23.py", """
        from opt_queue import ParallelToolkit, Prompt, OpenAIModel

        if __name__ == '__main__':
            data = {i: Prompt(instruction="Please write a sentence about the following topic: ", input="china") for i in
                    range(10)}
            ans = ParallelToolkit(config_path="config.json").parallel_api(data=data)
            print(ans)

            prompt = Prompt(instruction="Please write a sentence about the following topic: ", input="flowers")
            ans = ParallelToolkit(config_path="config.json").api(prompt=prompt)
            print(ans)

            prompt = Prompt(instruction="Please write a sentence about the following topic: ", input="flowers")
            model = OpenAIModel("gpt-3.5-turbo", temperature=0.1)
            ans = ParallelToolkit(config_path="config.json", openai_model=model).api(prompt=prompt)
            print(ans)
        """)
    result = python(example)
    assert result.returncode == 0, result.stderr
    many, one, custom = result.stdout.strip().splitlines()
    instruction = "Please write a sentence about the following topic: "

    def expected(model: str, topic: str) -> str:
        return sim_answer(model, [{"role": "system", "content": instruction}, {"role": "user", "content": topic}])

    assert ast.literal_eval(many) == {i: expected(MODEL, "china") for i in range(10)}
    assert one == expected(MODEL, "flowers")
    assert custom == expected("gpt-3.5-turbo", "flowers")
    received = sim.received()
    # ten identical prompts that sample (no temperature: the API's 1) are ten calls, as the
    # original toolkit made them, not one answer copied ten times
    assert len(received) == 12 and sim.stats()["calls"] == 12
    assert received[-1] == {"model": "gpt-3.5-turbo", "temperature": 0.1}
    assert all(r == {"model": MODEL} for r in received[:-1])
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob("*.oq-redis"))  # no files needed
    assert TEST_KEY not in result.stdout + result.stderr


def test_failures_are_none_in_parallel_api(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(models={MODEL: 100})
    write_config(tmp_path / "config.json", sim)
    example = script(tmp_path, "fail.py", """
        from opt_queue import ParallelToolkit, Prompt

        with ParallelToolkit(config_path="config.json") as tool:
            print(tool.parallel_api({"short": Prompt("", "hi"), "long": Prompt("", "x" * 2000)}))
        """)
    result = python(example)
    assert result.returncode == 0, result.stderr
    got = ast.literal_eval(result.stdout.strip())
    assert got == {"short": sim_answer(MODEL, [{"role": "user", "content": "hi"}]), "long": None}
