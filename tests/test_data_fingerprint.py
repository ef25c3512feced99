"""The data fingerprint at scale: streamed slice by slice, stored with the cache entry, equal to the
one-array digest checkpoints were written with; and data built once per job, the other processes loading it."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pyarrow.compute as pc
import pytest
from conftest import REPO
from test_data import EVAL, data_cfg

import mode.data.cache as cache_module
from mode.data.cache import DIGEST_FILE, rows_digest
from mode.data.dataset import build_data, load_data
from mode.models import byte_tokenizer
from mode.training.checkpoint import data_fingerprint


def one_array_fingerprint(rows) -> str:
    """The fingerprint as it was before it was streamed (every token flattened into one int64 array)."""
    digest = hashlib.sha256()
    table = rows.dataset.data
    digest.update("\x1f".join(table.column("id").to_pylist()).encode())
    digest.update(table.column("prompt_length").to_numpy().astype("int64").tobytes())
    ids = table.column("input_ids")
    digest.update(pc.list_value_length(ids).to_numpy().astype("int64").tobytes())
    digest.update(pc.list_flatten(ids).to_numpy().astype("int64").tobytes())
    return digest.hexdigest()


def test_streamed_and_stored_fingerprints_equal_the_one_array_digest(sni_fixture, tmp_path, monkeypatch):
    data = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=tmp_path)
    old = one_array_fingerprint(data.train)
    assert len(data.train) == 69
    for batch_rows in (1, 7, 69, 1000):  # slice boundaries anywhere, or none
        assert rows_digest(data.train.dataset, batch_rows) == old, batch_rows
    assert data.train.digest == old == data_fingerprint(data.train)
    stored = (tmp_path / "sni").glob(f"train-*/{DIGEST_FILE}")
    assert [p.read_text().strip() for p in stored] == [old]

    # a cache hit reads the stored digest: no token is hashed again
    monkeypatch.setattr(cache_module, "rows_digest", lambda *a: "never called")
    def refuse(*a, **k):
        raise AssertionError("hashed every token again")
    import mode.training.checkpoint as checkpoint_module
    monkeypatch.setattr(checkpoint_module, "rows_digest", refuse)
    again = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=tmp_path)
    assert data_fingerprint(again.train) == old


def test_uncached_rows_with_dropped_instances_hash_what_training_sees(sni_fixture, tmp_path):
    """Dropping over-long rows leaves an indices mapping on the uncached dataset: the fingerprint covers the
    kept rows only, as the cached copy does (the one-array digest hashed the dropped rows too)."""
    cfg = data_cfg(sni_fixture, encoding={"num_pos_examples": 0, "add_definition": False, "max_source_length": 70})
    uncached = build_data(cfg, EVAL, byte_tokenizer())
    cached = build_data(cfg, EVAL, byte_tokenizer(), cache_dir=tmp_path)
    assert 0 < len(uncached.train) < len(uncached.train.dataset.data)  # some rows were dropped
    assert uncached.train.digest is None
    assert data_fingerprint(uncached.train) == data_fingerprint(cached.train) == one_array_fingerprint(cached.train)


def test_another_process_loads_the_same_rows_from_the_handle(sni_fixture, tmp_path):
    data = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=tmp_path)
    handle = data.handle()
    assert set(handle["sources"]) == {"train", "eval"} and len(repr(handle)) < 5000  # small to broadcast
    loaded = load_data(handle)
    assert [dict(r) for r in loaded.train] == [dict(r) for r in data.train]
    assert [dict(r) for r in loaded.eval] == [dict(r) for r in data.eval]
    assert loaded.record() == data.record() and loaded.train.digest == data.train.digest
    assert build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer()).handle() is None  # no cache: nothing to share


RANKS = """
import json, sys
from accelerate import Accelerator
from omegaconf import OmegaConf
import mode.data.sni as sni
from mode.data.dataset import build_data, load_data
from mode.models import byte_tokenizer
from mode.training.checkpoint import data_fingerprint
from mode.training.distributed import data_on_main

acc = Accelerator(cpu=True)
cfg = OmegaConf.create(json.loads(sys.argv[1]))
reads = []
original = sni.load_task
def counting(*a, **k):
    reads.append(a[1])
    return original(*a, **k)
sni.load_task = counting
import mode.data.tasksets as tasksets
tasksets.load_task = counting
import time
import mode.training.distributed as distributed
distributed.DATA_WAIT_S = 1  # rank 1 polls several times while rank 0 builds (slowed down below)
def build():
    time.sleep(3)
    return build_data(cfg, OmegaConf.create({"max_instances_per_task": None}), byte_tokenizer(), cache_dir=sys.argv[2])
if sys.argv[3] == "bad":
    cfg.encoding.max_source_length = -1
try:
    data = data_on_main(acc, build, load_data)
except Exception as err:
    print("RANK", json.dumps({"rank": acc.process_index, "error": f"{type(err).__name__}: {err}"}), flush=True)
    sys.exit(0)
print("RANK", json.dumps({"rank": acc.process_index, "reads": sorted(set(reads)), "train": len(data.train),
                          "fingerprint": data_fingerprint(data.train), "tasks": data.tasks}), flush=True)
"""


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
def test_under_torchrun_only_the_main_process_reads_task_files(sni_fixture, tmp_path):
    import json

    from omegaconf import OmegaConf

    cfg = json.dumps(OmegaConf.to_container(data_cfg(sni_fixture)))
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    def launch(mode: str) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script), cfg, str(tmp_path / "cache"), mode], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return sorted((json.loads(line[5:]) for line in out.stdout.splitlines() if line.startswith("RANK ")),
                      key=lambda r: r["rank"])

    # a refusal on the main process reaches the waiting one, as the same one line
    bad = launch("bad")
    assert [r["rank"] for r in bad] == [0, 1] and bad[0]["error"] == bad[1]["error"]
    assert "ModeError: data.encoding.max_source_length=-1" in bad[1]["error"]
    ranks = launch("good")
    assert [r["rank"] for r in ranks] == [0, 1]
    # the three fixture tasks, read by rank 0 alone (headers first, then each part's records, a task at a time)
    assert len(ranks[0]["reads"]) == 3 and ranks[1]["reads"] == []
    assert ranks[0]["train"] == ranks[1]["train"] == 69
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] and ranks[0]["tasks"] == ranks[1]["tasks"]
