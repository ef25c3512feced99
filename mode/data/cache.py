"""The tokenised-data cache: encoded SNI instances kept as `datasets` Arrow files under
`<paths.cache_dir>/sni/<part>-<key>/`, loaded memory-mapped by later runs.

The key hashes everything that changes tokens: the source code that produces them (`code_digest`: edit
the encoding and the key changes, with no version number to remember to bump), the tokenizer (its full
serialised vocabulary, merges, normaliser and post-processor, special tokens and chat template), the
encoding options, the layout (decoder-only or seq2seq), each task file's SHA-256 and every instance to
encode (id, input, chosen answer or references, task index) — so split seeds, fractions, caps and task
lists change the key through the instances they select, and nothing that changes tokens can be missed.
Writes go to a temporary folder renamed into place under a file lock: concurrent sweep jobs encode once,
and a crash never leaves a half-written entry.
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

# The modules whose code decides the cached tokens (reading task files, prompt encoding, the cached rows).
TOKEN_SOURCES = ("sni.py", "encoding.py", "dataset.py", "cache.py")


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


def load_or_build(cache_dir, name: str, build):
    """(dataset, stats) from `<cache_dir>/sni/<name>/`, or from `build()` (then stored there).

    `cache_dir=None` disables the cache: the result of `build()` is returned as is."""
    if cache_dir is None:
        return build()
    from datasets import load_from_disk

    final = Path(str(cache_dir)) / "sni" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not (final / "mode_stats.json").is_file():
            dataset, stats = build()
            if not len(dataset):  # nothing to keep (and datasets cannot reload a table without rows)
                return dataset, stats
            tmp = final.parent / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with quiet_datasets():
                    dataset.save_to_disk(str(tmp))
                (tmp / "mode_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
                shutil.rmtree(final, ignore_errors=True)  # a folder without mode_stats.json is incomplete
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_datasets():
            loaded = load_from_disk(str(final))
        return loaded, json.loads((final / "mode_stats.json").read_text())
    except Exception as err:  # noqa: BLE001 - any unreadable entry gets the same advice
        raise ModeError(f"{final}: unreadable tokenised-data cache entry ({err}); delete the folder and rerun") from err
