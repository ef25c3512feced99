"""The tokenised-data cache: encoded SNI instances kept as `datasets` Arrow files under
`<paths.cache_dir>/sni/<part>-<key>/`, loaded memory-mapped by later runs.

The key hashes everything that changes tokens: the source code that produces them (`code_digest`: edit
the encoding or the splits and the key changes, with no version number to remember to bump), the tokenizer
(its full serialised vocabulary, merges, normaliser and post-processor, special tokens and chat template),
the encoding options, the layout (decoder-only or seq2seq), the selection values a part depends on (split
seed, evaluation fraction or pool, caps) and each task in order with its task index and its file's
SHA-256. The records are a function of exactly these (mode/data/dataset.py `_cache_name`; a test builds
many configurations and checks that equal keys always mean equal rows), so the key costs one read of each
task file and never a pass over two million instances.
Writes go to a temporary folder renamed into place under a file lock: concurrent sweep jobs encode once,
and a crash never leaves a half-written entry. A training entry also stores the digest of its rows
(`rows_digest`, the checkpoints' data fingerprint), computed once when it is written, so that loading it
never has to read every token again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from mode.errors import ModeError

# The modules whose code decides the cached tokens (reading task files, task sets, instance splits, prompt
# encoding, the cached rows).
TOKEN_SOURCES = ("sni.py", "tasksets.py", "splits.py", "encoding.py", "dataset.py", "cache.py")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the source of every module that produces the cached tokens."""
    digest = hashlib.sha256()
    for name in TOKEN_SOURCES:
        digest.update(name.encode() + b"\x1f" + (Path(__file__).parent / name).read_bytes() + b"\x1f")
    return digest.hexdigest()


class Key:
    """An incremental SHA-256 over text parts, with separators so ("ab", "c") != ("a", "bc")."""

    def __init__(self, *parts):
        self._h = hashlib.sha256()
        self.update("mode-sni-cache", code_digest(), *parts)

    def update(self, *parts) -> Key:
        for part in parts:
            self._h.update(str(part).encode("utf-8", "surrogatepass"))
            self._h.update(b"\x1f")
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what decides the tokenizer's output (not its object identity or path)."""
    key = Key(type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
              getattr(tokenizer, "chat_template", None) or "")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        key.update(backend.to_str())
    else:  # a slow tokenizer: datasets' own content hash of the object
        from datasets.fingerprint import Hasher

        key.update(Hasher.hash(tokenizer))
    return key.hexdigest()


@contextlib.contextmanager
def quiet_datasets():
    """No "Saving the dataset" / "Loading dataset" bars for a few files (tokenising keeps its bar)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


DIGEST_FILE = "mode_rows_sha256"
DIGEST_BATCH = 65536  # rows per slice: bounded memory whatever the data size


def rows_digest(dataset, batch_rows: int = DIGEST_BATCH) -> str:
    """SHA-256 of encoded training rows (`id`, `prompt_length`, `input_ids`), streamed slice by slice.

    The bytes hashed are exactly those of hashing at once the ids joined by \\x1f, then every
    prompt_length, every row length and every token as int64 (what the data fingerprint always was), so
    checkpoints written before it was streamed still resume. Reads only these columns of the memory-mapped
    table (an indices mapping, e.g. after dropping rows, is honoured), one slice at a time."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    n = len(dataset)
    rows = dataset.select_columns(["id", "prompt_length", "input_ids"]).with_format("arrow")

    def slices():
        for start in range(0, n, batch_rows):
            yield rows[start : start + batch_rows]

    for k, part in enumerate(slices()):
        digest.update(("\x1f" if k else "").encode() + "\x1f".join(part.column("id").to_pylist()).encode())
    for part in slices():
        digest.update(part.column("prompt_length").to_numpy().astype("int64").tobytes())
    for part in slices():
        digest.update(pc.list_value_length(part.column("input_ids")).to_numpy().astype("int64").tobytes())
    for part in slices():
        digest.update(pc.list_flatten(part.column("input_ids")).to_numpy().astype("int64").tobytes())
    return digest.hexdigest()


def entry_path(cache_dir, name: str) -> Path:
    return Path(str(cache_dir)) / "sni" / name


def load_entry(final: Path):
    """(dataset memory-mapped, stats, rows digest or None) of a complete cache entry."""
    from datasets import load_from_disk

    try:
        with quiet_datasets():
            loaded = load_from_disk(str(final))
        digest = final / DIGEST_FILE
        return (loaded, json.loads((final / "mode_stats.json").read_text()),
                digest.read_text().strip() if digest.is_file() else None)
    except Exception as err:  # noqa: BLE001 - any unreadable entry gets the same advice
        raise ModeError(f"{final}: unreadable tokenised-data cache entry ({err}); delete the folder and rerun") from err


def load_or_build(cache_dir, name: str, build, digest=None):
    """(dataset, stats, rows digest) from `<cache_dir>/sni/<name>/`, or from `build(workdir)` (then stored
    there; `workdir`: a folder for the build's intermediate Arrow files, removed afterwards, or None with no
    cache: the build keeps its rows in memory).

    `digest` (e.g. `rows_digest`), when given, is computed once on the written entry and stored with it;
    the third element is None otherwise. `cache_dir=None` disables the cache: the result of `build()` is
    returned as is (digest None)."""
    if cache_dir is None:
        return (*build(None), None)
    final = entry_path(cache_dir, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not (final / "mode_stats.json").is_file():
            tmp = final.parent / f".tmp-{name}-{os.getpid()}"
            work = final.parent / f".work-{name}-{os.getpid()}"  # build's own Arrow files, gone once saved
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            try:
                dataset, stats = build(work)
                if not len(dataset):  # nothing to keep (and datasets cannot reload a table without rows)
                    return dataset, stats, None
                with quiet_datasets():
                    dataset.save_to_disk(str(tmp))
                del dataset  # the in-memory table: from here on, the memory-mapped files
                if digest is not None:
                    from datasets import load_from_disk

                    with quiet_datasets():
                        (tmp / DIGEST_FILE).write_text(digest(load_from_disk(str(tmp))) + "\n")
                (tmp / "mode_stats.json").write_text(json.dumps(stats, indent=1) + "\n")  # last: marks it complete
                shutil.rmtree(final, ignore_errors=True)  # a folder without mode_stats.json is incomplete
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
    return load_entry(final)
