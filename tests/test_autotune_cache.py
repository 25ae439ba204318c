"""The autotuner's disk cache with bad files on purpose: entries of the wrong shape are dropped (not fatal for every
AUTO call), foreign and non-UTF-8 files are set aside, the file is bounded, and nothing is written without the lock."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import genesis_core
from conftest import reference_attention
from genesis_core.attn import autotune, dispatch
from genesis_core.attn.autotune import disk, signatures, store


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(tmp_path))
    autotune.set_mode("all")
    autotune.reload()
    yield tmp_path
    autotune.set_mode(None)
    autotune.clear(disk=False)


def _sig_for(q):
    from genesis_core.attn.types import AttentionCall

    return autotune.signature(AttentionCall(q, q, q, None, 1.0))


def _write(path, entries, env=None):
    path.write_text(json.dumps({"format": disk.FORMAT, "env": env or signatures.environment("cpu"),
                                "entries": entries}), encoding="utf-8")


@pytest.mark.parametrize("bad", [
    {"chosen": "sdpa", "ms": ["sdpa"]},
    {"chosen": "sdpa", "ms": {"sdpa": None}},
    {"chosen": "sdpa", "ms": {"sdpa": 1.0}, "rejected": "everything"},
    {"chosen": 3, "ms": {"sdpa": 1.0}},
    {"chosen": "sdpa", "ms": {"sdpa": float("inf")}},
    {"chosen": "no_such_backend", "ms": {"no_such_backend": 0.1}},
    "not an object",
])
def test_a_bad_entry_is_dropped_and_every_auto_call_still_works(cache, genesis_log, bad):
    q = torch.randn(1, 2, 32, 16)
    sig = _sig_for(q)
    good_sig = sig.replace("D16", "D24")
    path = autotune.cache_path("cpu")
    _write(path, {sig: bad, good_sig: {"chosen": "pytorch", "ms": {"pytorch": 1.0, "sdpa": 2.0}, "rejected": {}}})
    autotune.reload()
    out = genesis_core.attention(q, q, q)  # used to raise AttributeError / TypeError for every auto call
    assert torch.allclose(out.double(), reference_attention(q, q, q), atol=1e-5)
    assert autotune.lookup(good_sig)["chosen"] == "pytorch", "the good entries of the file are kept"
    assert any("dropped" in m for m in genesis_log), genesis_log
    data = json.loads(path.read_text())
    assert sig in data["entries"] and data["entries"][sig] != bad, "the bad entry is replaced by a measurement"


def test_a_non_utf8_file_is_set_aside_and_saving_works_again(cache):
    path = autotune.cache_path("cpu")
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    autotune.reload()
    q = torch.randn(1, 2, 16, 8)
    genesis_core.attention(q, q, q)
    assert json.loads(path.read_text())["entries"], "a measurement was saved"
    assert any(".corrupt-" in p.name for p in path.parent.iterdir())


def test_an_oversized_file_is_set_aside_without_being_parsed(cache, monkeypatch):
    path = autotune.cache_path("cpu")
    path.write_text('{"format": 1, "entries": {' + " " * (disk.MAX_FILE_BYTES + 10) + "}}", encoding="utf-8")
    parsed = []
    real = json.loads
    monkeypatch.setattr(disk.json, "loads", lambda s, *a, **k: (parsed.append(len(s)), real(s, *a, **k))[1])
    autotune.reload()
    t0 = time.perf_counter()
    assert autotune.lookup("cpu float32 anything") is None
    assert time.perf_counter() - t0 < 2.0
    assert not any(n > disk.MAX_FILE_BYTES for n in parsed)
    assert any(".oversized-" in p.name for p in path.parent.iterdir())


def test_the_file_keeps_the_newest_entries_only(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "MAX_ENTRIES", 10)
    env = {"kind": "test"}
    d = disk.DiskCache(env, tmp_path / "c.json")
    for i in range(25):
        d.update({f"s{i:02d}": {"chosen": "sdpa", "ms": {"sdpa": 1.0}, "when": f"2026-12-01T00:00:{i:02d}Z"}})
    kept = d.load()
    assert sorted(kept) == [f"s{i:02d}" for i in range(15, 25)]


def test_no_write_without_the_lock(tmp_path, monkeypatch, genesis_log):
    import fcntl

    monkeypatch.setattr(disk, "LOCK_TIMEOUT_S", 0.2)
    env = {"kind": "test"}
    path = tmp_path / "c.json"
    d = disk.DiskCache(env, path)
    assert d.update({"a": {"chosen": "sdpa", "ms": {"sdpa": 1.0}}})
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds the lock
    try:
        before = path.read_text()
        assert d.update({"b": {"chosen": "sdpa", "ms": {"sdpa": 1.0}}}) is False
        assert path.read_text() == before, "nothing may be written without the lock"
        assert any("not written" in m and "in memory" in m for m in genesis_log)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert d.update({"c": {"chosen": "sdpa", "ms": {"sdpa": 1.0}}})
    assert set(d.load()) == {"a", "c"}


def test_a_choice_that_could_not_be_saved_is_still_used_in_memory(cache, monkeypatch):
    monkeypatch.setattr(disk.DiskCache, "update", lambda self, entries: False)
    q = torch.randn(1, 2, 20, 8)
    genesis_core.attention(q, q, q)
    sig = _sig_for(q)
    assert autotune.lookup(sig) is not None and store._entries.get(sig) is not None
    assert dispatch.last_backend() == autotune.lookup(sig)["chosen"]
