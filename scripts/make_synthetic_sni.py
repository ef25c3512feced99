"""Write a synthetic full-size SNI folder (upstream layout) from the bundled trimmed copy.

    .venv/bin/python scripts/make_synthetic_sni.py /tmp/sni-full                 # upstream counts (~2.3M)
    .venv/bin/python scripts/make_synthetic_sni.py /tmp/sni-5pct --scale 0.05   # 5% of them
    .venv/bin/python scripts/make_synthetic_sni.py /tmp/sni-toy --max-per-task 30 --split train

The bundled copy keeps at most 500 instances per train task; upstream has about 2.0M over the 678 bundled
train tasks (`manifest.tsv`, `instances_upstream`). The data path's cost grows with that count, so it is
benchmarked on a folder where each task's instances are repeated, in order, up to round(scale x upstream
count) (at least 1; at most --max-per-task). The first pass keeps the original ids; each repeat gets new ids
(`<id>-r<k>`), so every id stays unique and a repeat's training answer is drawn afresh. Every other field of
the task file is kept. The split files are copied; `manifest.tsv` records the counts written.

Writes stream one instance at a time (memory stays small) into a temporary folder renamed into place.
The output must not go into the repository (use /tmp or another disk).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "sni"


def read_manifest(src: Path) -> list[dict]:
    path = src / "manifest.tsv"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found (the bundled SNI copy's manifest gives the upstream counts)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for i, row in enumerate(rows, start=2):
        if not row.get("task") or not str(row.get("instances_upstream", "")).isdigit():
            raise SystemExit(f"error: {path}: line {i} has no task or no integer instances_upstream: {row}")
    return rows


def target_count(upstream: int, scale: float, cap: int | None) -> int:
    """Instances to write for a task: round(scale x upstream), at least 1, at most `cap`."""
    n = max(1, round(upstream * scale))
    return min(n, cap) if cap else n


def write_task(src_file: Path, dst_file: Path, count: int) -> int:
    """Copy one task file with its instances repeated (new ids) up to `count`; returns the count written."""
    body = json.loads(src_file.read_text(encoding="utf-8"))
    instances = body.pop("Instances")
    if not instances:
        raise SystemExit(f"error: {src_file}: 'Instances' is empty, nothing to repeat")
    with dst_file.open("w", encoding="utf-8") as f:
        head = json.dumps(body, ensure_ascii=False)
        f.write(head[:-1] + (", " if body else "") + '"Instances": [')
        for k in range(count):
            inst = instances[k % len(instances)]
            lap = k // len(instances)
            if lap:
                inst = {**inst, "id": f"{inst.get('id', k % len(instances))}-r{lap}"}
            f.write((",\n" if k else "\n") + json.dumps(inst, ensure_ascii=False))
        f.write("\n]}\n")
    return count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to create (must not exist, unless --force)")
    p.add_argument("--src", default=str(DEFAULT_SRC), help=f"the bundled SNI copy (default {DEFAULT_SRC})")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each upstream count (default 1.0)")
    p.add_argument("--max-per-task", type=int, default=None, help="cap on instances per task (for tests)")
    p.add_argument("--split", choices=("all", "train", "test"), default="all",
                   help="which manifest rows to write (default all; data=sni_train reads only train)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 100:
        raise SystemExit(f"error: --scale={args.scale} must be in (0, 100]")
    if args.max_per_task is not None and args.max_per_task < 1:
        raise SystemExit(f"error: --max-per-task={args.max_per_task} must be a positive integer")
    src, out = Path(args.src), Path(args.out)
    if not (src / "tasks").is_dir():
        raise SystemExit(f"error: --src {src} has no tasks/ folder (expected the natural-instructions layout)")
    if out.resolve().is_relative_to(REPO):
        raise SystemExit(f"error: {out} is inside the repository; write synthetic data under /tmp or another disk")
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} exists; pass --force to replace it")
    rows = [r for r in read_manifest(src) if args.split == "all" or r["split"] == args.split]
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tasks").mkdir(parents=True)
    try:
        shutil.copytree(src / "splits", tmp / "splits")
        written, total = [], 0
        for i, row in enumerate(rows):
            count = target_count(int(row["instances_upstream"]), args.scale, args.max_per_task)
            src_file = src / "tasks" / f"{row['task']}.json"
            if not src_file.is_file():
                raise SystemExit(f"error: {src / 'manifest.tsv'}: task {row['task']} has no file {src_file}")
            total += write_task(src_file, tmp / "tasks" / src_file.name, count)
            written.append({**row, "instances_written": count})
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(rows)} tasks, {total:,} instances", file=sys.stderr, flush=True)
        fields = ["task", "split", "instances_upstream", "instances_written"]
        with (tmp / "manifest.tsv").open("w", newline="") as f:
            w = csv.DictWriter(f, fields, delimiter="\t", extrasaction="ignore")
            w.writeheader()
            w.writerows(written)
        (tmp / "README.md").write_text(
            f"Synthetic SNI written by scripts/make_synthetic_sni.py from {src} (scale {args.scale}, "
            f"cap {args.max_per_task}, split {args.split}): {len(written)} tasks, {total} instances.\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {len(written)} tasks, {total:,} instances", flush=True)


if __name__ == "__main__":
    main()
