"""scripts/make_synthetic_sni.py: a synthetic full-size SNI folder in the upstream layout, at toy size here."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from conftest import REPO, SHARED_SNI, needs_shared_sni
from test_data import EVAL, data_cfg

from mode.data.dataset import build_data
from mode.data.sni import load_task, read_task_list
from mode.models import byte_tokenizer

spec = importlib.util.spec_from_file_location("make_synthetic_sni", REPO / "scripts" / "make_synthetic_sni.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

# fixture tasks: bundled count -> an "upstream" count for the manifest
UPSTREAM = {"task001_add_numbers": ("train", 100), "task002_echo_word": ("train", 10),
            "task003_yes_no": ("train", 30), "task900_test_only": ("test", 400)}


def with_manifest(src):
    with (src / "manifest.tsv").open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["task", "split", "instances_upstream", "instances_kept", "categories"])
        for name, (split, n) in UPSTREAM.items():
            w.writerow([name, split, n, 0, "x"])
    return src


def written(out) -> dict[str, int]:
    with (out / "manifest.tsv").open(newline="") as f:
        return {r["task"]: int(r["instances_written"]) for r in csv.DictReader(f, delimiter="\t")}


def test_counts_follow_the_upstream_manifest_with_new_ids_for_repeats(sni_fixture, tmp_path):
    src, out = with_manifest(sni_fixture), tmp_path / "synthetic"
    gen.main([str(out), "--src", str(src), "--max-per-task", "60"])
    expected = {"task001_add_numbers": 60, "task002_echo_word": 10, "task003_yes_no": 30, "task900_test_only": 60}
    assert written(out) == expected
    # the upstream layout: tasks/<task>.json and the split files, readable by the loader
    assert sorted(p.name for p in (out / "tasks").iterdir()) == sorted(f"{t}.json" for t in expected)
    assert read_task_list(out / "splits/default/train_tasks.txt") == read_task_list(src / "splits/default/train_tasks.txt")
    for name, n in expected.items():
        original, synthetic = load_task(src, name), load_task(out, name)
        assert len(synthetic.instances) == n
        ids = [inst["id"] for inst in synthetic.instances]
        assert len(set(ids)) == n                                         # every id unique
        m = len(original.instances)
        assert ids[: min(n, m)] == [inst["id"] for inst in original.instances[:n]]  # first pass: original ids
        for k, inst in enumerate(synthetic.instances):                    # repeats: same content, in order
            source = original.instances[k % m]
            assert (inst["input"], inst["output"]) == (source["input"], source["output"])
            if k >= m:
                assert inst["id"] == f"{source['id']}-r{k // m}"
        assert synthetic.definition == original.definition and synthetic.categories == original.categories
        assert synthetic.positive_examples == original.positive_examples
    raw = json.loads((out / "tasks/task003_yes_no.json").read_text())
    assert raw["Domains"] == ["Tests"] and raw["Instance License"] == ["Unknown"]  # every other field kept


def test_scale_and_split_select_counts_and_the_output_builds(sni_fixture, tmp_path):
    src, out = with_manifest(sni_fixture), tmp_path / "scaled"
    gen.main([str(out), "--src", str(src), "--scale", "0.5", "--split", "train"])
    assert written(out) == {"task001_add_numbers": 50, "task002_echo_word": 5, "task003_yes_no": 15}
    data = build_data(data_cfg(out), EVAL, byte_tokenizer())
    assert len(data.train) + len(data.eval) == 70
    assert len({r["id"] for r in data.train} | {r["id"] for r in data.eval}) == 70


def test_refusals_name_the_problem(sni_fixture, tmp_path, capsys):
    src = with_manifest(sni_fixture)
    (tmp_path / "exists").mkdir()
    for argv, problem in [([str(tmp_path / "exists")], "exists; pass --force"),
                          ([str(REPO / "data" / "sni-synthetic")], "inside the repository"),
                          ([str(tmp_path / "a"), "--scale", "0"], "--scale=0.0"),
                          ([str(tmp_path / "b"), "--src", str(tmp_path)], "has no tasks/ folder")]:
        with pytest.raises(SystemExit, match=problem):
            gen.main([*argv, "--src", str(src)] if "--src" not in argv else argv)
    assert not (REPO / "data" / "sni-synthetic").exists() and not (tmp_path / "a").exists()


@needs_shared_sni
@pytest.mark.bundled_sni
def test_the_bundled_manifest_gives_every_task_at_toy_size(tmp_path):
    out = tmp_path / "toy"
    gen.main([str(out), "--split", "test", "--max-per-task", "2"])
    with (SHARED_SNI / "manifest.tsv").open(newline="") as f:
        test_tasks = [r["task"] for r in csv.DictReader(f, delimiter="\t") if r["split"] == "test"]
    assert written(out) == dict.fromkeys(test_tasks, 2)
    assert len(list((out / "tasks").glob("*.json"))) == len(test_tasks) == 104
