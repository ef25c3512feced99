"""The documentation keeps working: README.md stays short, its links and docs/'s point at real files, and
every Python snippet marked runnable runs as pasted.

A snippet is runnable when the line before its ```python fence is `<!-- test: run -->`; it runs in a fresh
interpreter (the repo's Python, a scratch working directory), so it may use nothing it does not define or
import. `<!-- test: run needs=sni -->` marks a snippet that needs the SNI folder: skipped without one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from conftest import REPO, SHARED_SNI

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 15_000
MARKER = re.compile(r"<!--\s*test:\s*run(?P<needs>\s+needs=\w+)?\s*-->")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def runnable_blocks(path: Path) -> list[tuple[str, int, str, str | None]]:
    """(page name, line of the fence, code, requirement) of every marked ```python block of a page."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.fullmatch(line.strip())
        if not marker:
            continue
        if i + 1 >= len(lines) or lines[i + 1].strip() != "```python":
            raise AssertionError(f"{path.name}:{i + 1}: a run marker must be followed by a ```python fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path.name}:{i + 2}: the ```python block is never closed")
        needs = marker.group("needs").split("=")[1] if marker.group("needs") else None
        blocks.append((path.relative_to(REPO).as_posix(), i + 2, "\n".join(lines[i + 2:end]) + "\n", needs))
    return blocks


BLOCKS = [block for page in PAGES for block in runnable_blocks(page)]


def test_readme_is_at_most_15000_bytes():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (> {README_MAX_BYTES}): move a topic into docs/"


def test_the_python_api_page_has_a_runnable_snippet():
    assert any(page == "docs/python_api.md" and needs is None for page, _, _, needs in BLOCKS)


@pytest.mark.parametrize("page,line,code,needs", BLOCKS, ids=[f"{p}:{line}" for p, line, _, _ in BLOCKS])
def test_marked_snippet_runs_as_pasted(page, line, code, needs, tmp_path):
    if needs == "sni" and not (SHARED_SNI / "tasks").is_dir():
        pytest.skip(f"needs the SNI folder ({SHARED_SNI} not found; set MODE_SNI_DIR)")
    assert needs in (None, "sni"), f"{page}:{line}: unknown requirement needs={needs}"
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # this checkout's mode, whichever checkout the venv was installed from
    assert proc.returncode == 0, f"{page}:{line}: the snippet failed\n{proc.stderr[-3000:]}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not re.match(r"#{1,6} ", line):
            continue
        text = line.lstrip("#").strip().lower()
        slug = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # links in code are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_the_link_checker_sees_links():
    assert "docs/python_api.md" in relative_links(README)
    assert any(t.startswith("../results/cpu_check/") for t in relative_links(REPO / "docs" / "reproducing.md"))
