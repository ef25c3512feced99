"""scripts/check_numbers.py: a number quoted in the docs either appears in the committed file it cites (inline
or in scripts/number_sources.tsv) or the script reports it and fails; on this repository every number has a
source that contains it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("check_numbers", REPO / "scripts" / "check_numbers.py")
check_numbers = importlib.util.module_from_spec(spec)
sys.modules["check_numbers"] = check_numbers  # dataclasses look their module up there
spec.loader.exec_module(check_numbers)

DOC = """# Results

LoRA scored 27.10 (`results/summary.json`) and MoDE **25.3** `results/summary.json`; the win rate was 64%
(`results/summary.json`). A wrong one: 31.5 (`results/summary.json`). A loose one: 12.75, and 1,234,567 too.
Installed with Python 3.11 and torch 2.13.0, released as mode 0.3; `lr 0.001` and `x = 4.5` are code.
Registered: 0.976. Exempt: 0.05. Uncommitted source: 7.7 (`results/scratch.json`). Itself: 9.9 (`doc.md`).

```
make train   # 55.5 in a code block
```
"""


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text('{"lora": 27.1046, "mode": 25.29, "win": 0.6364}\n')
    (tmp_path / "results" / "routing.json").write_text('{"entropy": [0.97612, 0.99]}\n')
    (tmp_path / "doc.md").write_text(DOC)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "results/summary.json", "results/routing.json", "doc.md"], check=True)
    subprocess.run([*git, "commit", "-qm", "fixture"], check=True)
    (tmp_path / "results" / "scratch.json").write_text('{"x": 7.7}\n')  # present, never committed
    register = tmp_path / "sources.tsv"
    register.write_text("# doc, number, source\n"
                        "doc.md\t0.976\tresults/routing.json\tentropy\n"
                        "doc.md\t0.05\t-\ta setting\n")
    return tmp_path, register


def test_each_number_is_sourced_reported_or_exempt(repo):
    root, register = repo
    findings = {f.number.text: f for f in check_numbers.check(["doc.md"], repo=root, register_path=register)}
    assert set(findings) == {"27.10", "25.3", "64%", "31.5", "12.75", "1,234,567", "0.976", "0.05", "7.7", "9.9"}
    status = {text: f.status for text, f in findings.items()}
    assert status == {"27.10": "sourced", "25.3": "sourced", "64%": "sourced", "0.976": "sourced",
                      "31.5": "wrong", "7.7": "wrong", "9.9": "wrong",
                      "12.75": "unsourced", "1,234,567": "unsourced", "0.05": "exempt"}
    assert "does not contain it" in findings["31.5"].detail
    assert "not a committed file" in findings["7.7"].detail
    assert "itself" in findings["9.9"].detail
    assert findings["12.75"].line() == "doc.md:4: 12.75: no source"


def test_rounding_is_at_the_quoted_precision():
    q = check_numbers.Quoted("d", 1, "27.10", None, False)
    assert check_numbers.contains(check_numbers.source_values_of_text("27.1049"), q)
    assert not check_numbers.contains(check_numbers.source_values_of_text("27.106 271.0 2.71"), q)
    pct = check_numbers.Quoted("d", 1, "2%", None, True)
    assert check_numbers.contains(check_numbers.source_values_of_text("rtol=2e-2"), pct)


def test_exit_status(repo, monkeypatch):
    root, register = repo
    monkeypatch.setattr(check_numbers, "REPO", root)
    monkeypatch.setattr(check_numbers, "REGISTER", register)
    (root / "good.md").write_text("Scored 27.10 (`results/summary.json`) and 12.75.\n")
    assert check_numbers.main(["good.md"]) == 1               # an unsourced number is fatal ...
    assert check_numbers.main(["good.md", "--lenient"]) == 0  # ... unless --lenient
    (root / "good.md").write_text("Scored 27.10 (`results/summary.json`).\n")
    assert check_numbers.main(["good.md"]) == 0
    assert check_numbers.main(["doc.md", "--lenient"]) == 1   # a cited number missing from its source always is


def test_every_number_of_this_repository_has_a_source_that_contains_it():
    """README.md, docs/*.md, results/*/README.md: no number without a source, none missing from its source."""
    proc = subprocess.run([sys.executable, "scripts/check_numbers.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    last = proc.stdout.splitlines()[-1]
    assert " 0 without a source, 0 not found in the source they cite" in last, last
