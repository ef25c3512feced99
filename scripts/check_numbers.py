"""Every number a document quotes traces to a committed file that contains it.

    python scripts/check_numbers.py                 # README.md, docs/*.md, results/*/README.md
    python scripts/check_numbers.py --lenient       # fail only on wrong citations, not on unsourced numbers
    python scripts/check_numbers.py docs/training.md --list

What counts as a quoted number: in prose (not in fenced code blocks, inline `code`, link targets or HTML
comments), a decimal number (27.10, 0.976, +0.22), a percentage (64%, 6.31%) or an integer written with
thousands separators (1,981,884,416). Versions (torch 2.13.0, Python 3.11, mode 0.3) and section numbers are
not numbers of this kind. Plain integers are not checked (most are settings: 100 steps, rank 16).

How a number cites its source, either way:
1. inline: a backtick span naming a committed file right after the number (only spaces, `**`, `%`, `(`,
   `[` and `,` between them; at the start of the next line when the number ends its line), e.g.
       LoRA 64 scores 21.81 (`results/cpu_check/table2.md`)
2. registered: a line `<document> TAB <number as written> TAB <source file> [TAB note]` in
   scripts/number_sources.tsv (for tables and for documents that should stay free of citations), the
   number as the document writes it (`27.10`, `64%`, `1.038×`). A source `-` marks a number that is not a
   measurement (a setting, a release); the note says what it is. A document cannot cite itself.

A source contains a number when one of its numbers (any number in the file's text, JSON or not, thousands
separators `,` and `_` removed) rounds to it at the number's own precision: 27.10 matches 27.1046, 64% matches 63.64
(and 0.6364, as a fraction). Sources must be files git tracks: a number traced to a file nobody can see
traces to nothing.

Exit status 1 when a number has no source at all, or a cited or registered number is not in its source (or
the source is not a committed file); the lines printed say which. --lenient (while drafting a document)
fails only on the latter. tests/test_check_numbers.py runs the strict check on the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGISTER = REPO / "scripts" / "number_sources.tsv"
DEFAULT_DOCS = ["README.md", "docs/*.md", "results/*/README.md"]

# a number in prose: optional sign, digits with thousands separators or a decimal part, optional percent sign
NUMBER = re.compile(r"(?<![\w.\-/])([+\-−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+(?=\s?%)))(\s?%|×|x(?!\w))?"
                    r"(?![\w]|\.\d)")
# a number right after one of these words is a version or a section, not a quoted result (case-sensitive: "mode 0.3"
# is a release, "MoDE 23.48" a score)
VERSION_WORDS = ("Python", "python", "torch", "transformers", "mode", "version", "PEFT", "peft", "CUDA", "numpy",
                 "Hydra", "ruff", "Linux", "macOS", "≥", ">=", "Section", "section", "§", "Sec.", "Figure", "Fig.", "Eq.")
VERSION_BEFORE = re.compile(r"(?:^|[^\w])(?:" + "|".join(map(re.escape, VERSION_WORDS)) + r")$")
CITATION = re.compile(r"^[\s*%(\[,]*`([^`\s]+)`")
# in a source: 1,234 (text) and 1_234 (Python) group thousands
SOURCE_NUMBER = re.compile(r"[-+]?\d{1,3}(?:[,_]\d{3})+(?:\.\d+)?|[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Quoted:
    doc: str
    line: int
    text: str            # as written, e.g. "27.10", "64%", "1,981,884,416"
    cited: str | None    # an inline citation, if any
    percent: bool

    @property
    def value(self) -> Decimal:
        return Decimal(self.text.rstrip("%×x").strip().replace(",", "").replace("−", "-"))

    @property
    def places(self) -> int:
        number = self.text.rstrip("%×x").strip()
        return len(number.split(".")[1]) if "." in number else 0


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """The text with code blocks, inline code, link targets and HTML comments blanked (line numbers kept)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", _blank, text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", _blank, text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", _blank, text)
    return text


def quoted_numbers(doc: str, text: str) -> list[Quoted]:
    out = []
    plain = prose(text)
    originals = text.splitlines()
    previous = ""
    for n, line in enumerate(plain.splitlines(), 1):
        original = originals[n - 1] if n - 1 < len(originals) else line
        code_free = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)
        for m in NUMBER.finditer(code_free):
            before = (previous + " " + code_free[: m.start()]).rstrip()  # "... mode\n0.3" is a version too
            if VERSION_BEFORE.search(before):
                continue
            percent = bool(m.group(2)) and "%" in m.group(2)
            after = original[m.end():]
            if not after.strip() and n < len(originals):  # a number that ends its line: the next line's start
                after = originals[n]
            cite = CITATION.match(after)
            out.append(Quoted(doc, n, m.group(0).strip(), cite.group(1) if cite else None, percent))
        previous = code_free.rstrip()[-40:]
    return out


def source_values(path: Path) -> list[Decimal]:
    return source_values_of_text(path.read_text(encoding="utf-8", errors="replace"))


def source_values_of_text(text: str) -> list[Decimal]:
    values = []
    for token in SOURCE_NUMBER.findall(text):
        try:
            value = Decimal(token.replace(",", "").replace("_", ""))
        except InvalidOperation:
            continue
        if value.is_finite() and -20 <= value.adjusted() <= 20:  # 1e999 and the like are no quoted numbers
            values.append(value)
    return values


def rounds_to(value: Decimal, target: Decimal, places: int) -> bool:
    q = Decimal(1).scaleb(-places)
    try:
        return any(value.quantize(q, rounding=r) == target for r in (ROUND_HALF_UP, ROUND_HALF_EVEN))
    except InvalidOperation:
        return False


def contains(values: list[Decimal], number: Quoted) -> bool:
    target, places = abs(number.value), number.places
    for v in values:
        candidates = [abs(v)] + ([abs(v) * 100] if number.percent else [])
        if any(rounds_to(c, target, places) for c in candidates):
            return True
    return False


def tracked_files(repo: Path) -> set[str] | None:
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None  # not a git checkout: existing files count
    return set(proc.stdout.split("\0")) - {""}


def read_register(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """{(document, number as written): (source or "-", note)}."""
    register = {}
    if not path.is_file():
        return register
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise SystemExit(f"{path}:{n}: expected <document> TAB <number> TAB <source> [TAB note]")
        register[(parts[0].strip(), parts[1].strip())] = (parts[2].strip(), parts[3].strip() if len(parts) > 3 else "")
    return register


@dataclass
class Finding:
    number: Quoted
    status: str          # "sourced", "exempt", "unsourced", "wrong"
    source: str | None
    detail: str = ""

    def line(self) -> str:
        where = f"{self.number.doc}:{self.number.line}: {self.number.text}"
        if self.status == "unsourced":
            return f"{where}: no source"
        if self.status == "wrong":
            return f"{where}: {self.detail}"
        return f"{where}: {self.status} ({self.source})"


def check(docs: list[str], repo: Path | None = None, register_path: Path | None = None) -> list[Finding]:
    repo = REPO if repo is None else repo
    register = read_register(REGISTER if register_path is None else register_path)
    tracked = tracked_files(repo)
    cache: dict[str, list[Decimal]] = {}
    findings = []
    for doc in docs:
        text = (repo / doc).read_text(encoding="utf-8")
        for q in quoted_numbers(doc, text):
            source, note = (q.cited, "inline") if q.cited else register.get((doc, q.text), (None, ""))
            if source is None:
                findings.append(Finding(q, "unsourced", None))
                continue
            if source == "-":
                findings.append(Finding(q, "exempt", note or "-"))
                continue
            path = repo / source
            if source == doc:
                findings.append(Finding(q, "wrong", source, "cites the document itself"))
                continue
            if not path.is_file() or (tracked is not None and source not in tracked):
                findings.append(Finding(q, "wrong", source,
                                        f"cites {source}, which is not a committed file (git add it)"))
                continue
            if source not in cache:
                cache[source] = source_values(path)
            if contains(cache[source], q):
                findings.append(Finding(q, "sourced", source))
            else:
                findings.append(Finding(q, "wrong", source, f"cites {source}, which does not contain it"))
    return findings


def default_docs(repo: Path | None = None) -> list[str]:
    repo = REPO if repo is None else repo
    docs = []
    for pattern in DEFAULT_DOCS:
        docs += sorted(str(p.relative_to(repo)) for p in repo.glob(pattern) if p.is_file())
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", nargs="*", help="documents relative to the repository (default: "
                                                + ", ".join(DEFAULT_DOCS) + ")")
    parser.add_argument("--lenient", action="store_true", help="do not fail on numbers that cite no source")
    parser.add_argument("--strict", action="store_true", help="fail when a number has no source (the default)")
    parser.add_argument("--list", action="store_true", help="print every number found, sourced or not")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(argv)
    findings = check(args.docs or default_docs())
    counts = {s: sum(f.status == s for f in findings) for s in ("sourced", "exempt", "unsourced", "wrong")}
    if args.json:
        print(json.dumps([{"doc": f.number.doc, "line": f.number.line, "number": f.number.text,
                           "status": f.status, "source": f.source, "detail": f.detail} for f in findings], indent=1))
    else:
        for f in findings:
            if args.list or f.status in ("wrong", "unsourced"):
                print(f.line())
        if counts["unsourced"] or counts["wrong"]:
            print("how to source a number: see the top of scripts/check_numbers.py (an inline `file` citation, "
                  "or a row in scripts/number_sources.tsv)")
        print(f"{len(findings)} numbers: {counts['sourced']} sourced, {counts['exempt']} exempt, "
              f"{counts['unsourced']} without a source, {counts['wrong']} not found in the source they cite")
    return 1 if counts["wrong"] or (counts["unsourced"] and not args.lenient) else 0


if __name__ == "__main__":
    sys.exit(main())
