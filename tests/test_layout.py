"""The package's layout holds: its import graph has no circle and no package imports one above it
in the layering (every import of one opt_queue module by another is counted, at module level,
inside functions and under ``TYPE_CHECKING`` alike), so that each room can be read knowing only
the ones below it; and the engine runs without Celery."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import opt_queue

PACKAGE = Path(opt_queue.__file__).parent


def module_name(path: Path) -> str:
    parts = ["opt_queue", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The opt_queue modules that ``path`` imports, wherever in the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # a module or a name in one
        else:
            continue
        for name in names:
            while name and name not in modules:  # opt_queue.store.jobs.Job -> opt_queue.store.jobs
                name = name.rpartition(".")[0]
            if name and name != here and name != "opt_queue":  # the package's face imports no room
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_circle_and_every_kind_of_import(tmp_path: Path) -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    sample = PACKAGE / "core" / "request.py"  # a module that imports no other room: the test reads others'
    graph = import_graph()
    assert graph[module_name(sample)] <= {"opt_queue.core.errors"}
    assert "opt_queue.store.jobs" in graph["opt_queue.engine.engine"]  # from opt_queue.store.jobs import ...
    assert "opt_queue.store.keys" in graph["opt_queue.store.jobs"]  # from opt_queue import keys
    assert "opt_queue.jobflow.runner" in graph["opt_queue.cli.ui"]  # an import inside a function counts
    assert "opt_queue.core.answers" in graph["opt_queue.core.formats"]  # so does one under TYPE_CHECKING


def test_no_module_imports_itself_back_through_others() -> None:
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


LAYERS = [
    {"core"},                        # requests, answers, formats, tokens, prices, config, errors
    {"store", "providers", "sim"},   # Redis; the APIs; the simulated API
    {"limits"},                      # windows, budgets, admission queues
    {"engine"},                      # a worker's rows: the error policy
    {"queue"},                       # Celery, kombu, task messages, recovery
    {"lanes"},                       # the Batch API lane
    {"worker"},                      # the Celery task on the engine
    {"jobflow"},                     # submit, collect, run, estimate, status
    {"cli"},                         # the command line
    {"compat", "__main__"},          # the original toolkit's API; python -m opt_queue
    {""},                            # the package's face (opt_queue/__init__.py)
]


def layer(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    return next(n for n, rooms in enumerate(LAYERS) if room in rooms)


def test_no_package_imports_one_above_it_or_beside_it() -> None:
    wrong = sorted(f"{a} -> {b}" for a, deps in import_graph().items() for b in deps
                   if a.split(".")[:2] != b.split(".")[:2] and layer(b) >= layer(a))
    assert not wrong, "imports against the layering (README: project layout): " + "; ".join(wrong)


def test_every_package_is_on_a_layer() -> None:
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert rooms <= set().union(*LAYERS), f"rooms on no layer: {rooms - set().union(*LAYERS)}"


def test_the_engine_runs_without_celery_and_no_import_builds_the_app() -> None:
    code = ("import sys, opt_queue.engine.engine, opt_queue.providers.openai\n"
            "print(sorted(m for m in ('celery', 'kombu') if m in sys.modules))\n"
            "import opt_queue, opt_queue.jobflow.producer, opt_queue.jobflow.collector, opt_queue.cli.commands\n"
            "from opt_queue.queue import app as module\n"
            "print(module._app is None)\n"
            "from opt_queue.queue.app import app\n"  # what `celery -A opt_queue.queue.app` finds
            "print(app is module.get_app() and type(app).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "True", "Celery"]


JOB_INTERNALS = {"meta_key", "_scripts", "_publish_call", "_release_call", "_lease_call", "_renew_call"}


def store_leaks(path: Path) -> list[str]:
    """Where a module outside ``store/`` names a Redis key itself or reaches into a job's state:
    a literal ``oq:`` key or kombu's ``unacked`` names (``store/keys.py`` has them all), a job's
    hash (``meta_key``) or another object's row scripts (``x._scripts``, ``job._release_call``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value.startswith("oq:") or node.value in ("unacked", "unacked_index")):
            found.append(f"{path.name}:{node.lineno} names {node.value!r}")
        if isinstance(node, ast.Attribute) and node.attr in JOB_INTERNALS:
            own = isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr == "_scripts"
            if not own:
                found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    return found


def test_only_the_store_names_redis_keys_and_job_fields(tmp_path: Path) -> None:
    leaks = [leak for p in sorted(PACKAGE.rglob("*.py")) if "store" not in p.relative_to(PACKAGE).parts
             for leak in store_leaks(p)]
    assert not leaks, "Redis names and job state belong to opt_queue/store: " + "; ".join(leaks)
    sample = tmp_path / "leaky.py"  # the finder sees each kind of leak
    sample.write_text('r.hget("oq:{j}:meta", "x")\npipe.hincrby(job.meta_key, "n", 1)\n'
                      'job._scripts.release()\nr.hlen("unacked")\nself._scripts.due()\n')
    assert len(store_leaks(sample)) == 4


SDKS = ("openai", "anthropic", "google", "httpx", "httpx2")


def sdk_imports(path: Path) -> list[str]:
    """The providers' SDKs (and their HTTP stacks) that ``path`` imports, wherever in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in SDKS]
    return found


def test_only_the_providers_import_an_api_sdk(tmp_path: Path) -> None:
    """Calls, batches and their errors go through the provider seam: no other room knows an SDK."""
    leaks = [leak for p in sorted(PACKAGE.rglob("*.py")) if "providers" not in p.relative_to(PACKAGE).parts
             for leak in sdk_imports(p)]
    assert not leaks, "an API SDK imported outside opt_queue/providers: " + "; ".join(leaks)
    sample = tmp_path / "sdk.py"
    sample.write_text("import openai\nfrom google import genai\nfrom . import openai_like\nimport json\n")
    assert len(sdk_imports(sample)) == 2
