"""The README is a front door and docs/ the reference: the site builds with no broken link or
page left out, the README's links lead somewhere, and every command and flag of the CLI is in the
CLI reference, in its command's row, once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click

from opt_queue.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as the docs site (Python-Markdown's toc) makes it."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines()
            if re.match(r"^#{1,6} ", line)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs in strict mode fails on a page missing from the navigation, a link to no page or to no
    heading."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stderr
    assert (tmp_path / "site" / "rate-limits" / "index.html").exists()


def test_the_readme_is_a_front_door_whose_links_lead_somewhere() -> None:
    readme = ROOT / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"the README has {len(lines)} lines: move reference material to docs/"
    assert broken_links(readme) == []
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme.read_text(encoding="utf-8"))}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= linked, f"pages the README does not lead to: {sorted(pages - linked)}"


def test_the_link_checker_sees_a_broken_file_and_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\n## Some heading\n\n[ok](a.md#some-heading) [gone](b.md) "
                                   "[bad](a.md#nothing) [web](https://example.com)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md (no such file)", "a.md#nothing (no such heading)"]


def test_every_command_and_flag_is_in_the_cli_reference_once() -> None:
    reference = (DOCS / "cli.md").read_text(encoding="utf-8")
    rows: dict[str, list[str]] = {}
    for line in reference.splitlines():
        m = re.match(r"^\| `opt-queue (\S+)(.*?)` \|", line)
        if m:
            rows.setdefault(m.group(1), []).append(m.group(2))
    missing = []
    for name, command in main.commands.items():
        if command.hidden:
            continue
        assert len(rows.get(name, [])) == 1, f"`opt-queue {name}` has {len(rows.get(name, []))} rows in docs/cli.md"
        usage = rows[name][0]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                flags = param.opts + param.secondary_opts  # `-c CONFIG` documents -c/--config
                if not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage) for f in flags):
                    missing.append(f"{name} {'/'.join(param.opts)}")
    assert not missing, f"flags missing from their command's row in docs/cli.md: {missing}"
    assert set(rows) <= set(main.commands), f"docs/cli.md documents commands that do not exist: {set(rows) - set(main.commands)}"
