"""The autotuner on CPU: cache hit/miss, disk file (corrupt, foreign, concurrent writers), accuracy
rejection of a deliberately wrong backend, fallback when every candidate fails, switches, threads."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import torch

import genesis_core
from genesis_core.attn import autotune, dispatch, registry
from genesis_core.attn.autotune import disk as autotune_cache, measuring, signatures
from genesis_core.attn.registry import Backend
from genesis_core.attn.types import AttentionCall

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Measuring on (CPU included), a private cache dir, a small budget; state restored afterwards."""
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GENESIS_AUTOTUNE_BUDGET_MS", "3000")
    autotune.set_mode("all")
    autotune.clear()
    added = []

    def add(name, run, tolerance=None):
        b = Backend(name=name, probe=lambda: None, unsupported=lambda call: None, run=run,
                    description=lambda: "test backend", tolerance=tolerance or {})
        registry.register(b)
        added.append(name)
        dispatch.clear_plans()
        return b

    yield types.SimpleNamespace(add=add, path=tmp_path / "cache")
    for name in added:
        registry.unregister(name)
    autotune.set_mode(None)
    autotune.clear(disk=False)
    dispatch.clear_plans()


def qkv(b=1, h=2, nq=32, nk=24, d=16, dtype=torch.float32):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, h, nk, d, dtype=dtype),
            torch.randn(b, h, nk, d, dtype=dtype))


def reference(q, k, v, mask=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def count_measures(monkeypatch):
    calls = []
    real = autotune.measure

    def counting(call, names, budget_ms=None):
        calls.append(autotune.signature(call))
        return real(call, names, budget_ms)

    monkeypatch.setattr(measuring, "measure", counting)
    return calls


def test_buckets_are_half_octaves():
    assert [autotune.bucket(n) for n in (1, 16, 17, 77, 4096, 4608, 32760)] == [1, 16, 23, 91, 4096, 5793, 32768]
    sizes = list(range(1, 5000, 7))
    assert all(autotune.bucket(a) <= autotune.bucket(b) for a, b in zip(sizes, sizes[1:]))
    assert all(autotune.bucket(n) >= n for n in sizes)


def test_cpu_measuring_is_off_by_default_and_env_switch(monkeypatch):
    autotune.set_mode(None)
    monkeypatch.delenv("GENESIS_AUTOTUNE", raising=False)
    assert autotune.mode() == "accelerators"
    assert not autotune.enabled_for(torch.device("cpu"))
    assert autotune.enabled_for(torch.device("cuda"))
    monkeypatch.setenv("GENESIS_AUTOTUNE", "0")
    assert not autotune.enabled_for(torch.device("cuda"))
    monkeypatch.setenv("GENESIS_AUTOTUNE", "all")
    assert autotune.enabled_for(torch.device("cpu"))
    with pytest.raises(ValueError, match="autotune mode"):
        autotune.set_mode("sometimes")


def test_env_off_measures_nothing(tuner, monkeypatch):
    autotune.set_mode(None)
    monkeypatch.setenv("GENESIS_AUTOTUNE", "off")
    calls = count_measures(monkeypatch)
    q, k, v = qkv()
    out = genesis_core.attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert calls == [] and autotune.timings() == {}
    assert dispatch.last_backend() == dispatch.DEFAULT_AUTO_ORDER[0]


def test_miss_measures_then_hits_memory_and_disk(tuner, monkeypatch):
    calls = count_measures(monkeypatch)
    q, k, v = qkv(nq=32)
    out = genesis_core.attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    sig = calls[0]
    row = autotune.timings()[sig]
    assert row["chosen"] == dispatch.last_backend()
    timed = {n: v for n, v in row.items() if n not in ("chosen", "rejected")}
    assert row["chosen"] == autotune.prefer_default(timed, list(timed))
    assert timed[row["chosen"]] <= min(timed.values()) * (1 + autotune.TIE_MARGIN)
    # Another exact shape in the same buckets: a memory hit, nothing measured.
    q2, k2, v2 = qkv(nq=30, nk=23)
    genesis_core.attention(q2, k2, v2)
    assert len(calls) == 1
    # A new head_dim is a new signature: a miss.
    genesis_core.attention(*qkv(d=32))
    assert len(calls) == 2
    # The file holds both; after dropping memory, the choice comes back from disk without measuring.
    data = json.loads(autotune.cache_path().read_text())
    assert sig in data["entries"] and data["env"] == autotune.environment("cpu")
    autotune.reload()
    assert autotune.lookup(sig)["chosen"] == row["chosen"]
    genesis_core.attention(q, k, v)
    assert len(calls) == 2


def test_clear_forgets_memory_and_file(tuner, monkeypatch):
    calls = count_measures(monkeypatch)
    q, k, v = qkv()
    genesis_core.attention(q, k, v)
    path = autotune.cache_path()
    assert path.exists()
    autotune.clear()
    assert not path.exists() and autotune.timings() == {}
    genesis_core.attention(q, k, v)
    assert len(calls) == 2


@pytest.mark.parametrize("content, kind", [
    ("{not json", "corrupt"),
    ('{"format": 1, "env": {}, "entries": []}', "corrupt"),
    ('{"format": 1, "env": {"torch": "0.0"}, "entries": {}}', "foreign"),
])
def test_corrupt_or_foreign_file_is_set_aside_and_rebuilt(tuner, monkeypatch, content, kind):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    autotune.reload()
    calls = count_measures(monkeypatch)
    q, k, v = qkv()
    out = genesis_core.attention(q, k, v)  # never fatal
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    aside = list(path.parent.glob(path.name + f".{kind}-*"))
    assert len(aside) == 1 and aside[0].read_text() == content
    data = json.loads(path.read_text())
    assert calls[0] in data["entries"]


def test_unwritable_cache_dir_is_not_fatal(tuner, monkeypatch, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(blocker / "sub"))
    q, k, v = qkv(d=8)
    out = genesis_core.attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert any(s for s in autotune.timings())


def test_concurrent_writers_keep_every_entry(tmp_path):
    env = {"test": "concurrent"}
    path = tmp_path / "autotune-test.json"
    # Separate DiskCache objects (separate in-process locks), as separate processes would be.
    def writer(i):
        cache = autotune_cache.DiskCache(env, path)
        for j in range(15):
            cache.update({f"t{i}-{j}": {"chosen": "sdpa", "ms": {"sdpa": float(j)}}})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from genesis_core.attn.autotune.disk import DiskCache
        cache = DiskCache({env!r}, {str(path)!r})
        for j in range(15):
            cache.update({{f"p{{sys.argv[1]}}-{{j}}": {{"chosen": "pytorch", "ms": {{"pytorch": 1.0}}}}}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = autotune_cache.DiskCache(env, path).load()
    want = {f"t{i}-{j}" for i in range(6) for j in range(15)} | {f"p{i}-{j}" for i in range(2) for j in range(15)}
    assert set(entries) == want
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.corrupt-*"))


def test_inaccurate_fast_backend_is_rejected(tuner, monkeypatch):
    # Deliberately wrong and as fast as a backend can be: returns (a view of) q.
    tuner.add("wrong_fast", lambda call: call.q[..., : call.v_head_dim])
    tuner.add("nan_out", lambda call: torch.full_like(call.q, float("nan")))
    tuner.add("raises", lambda call: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    tuner.add("bad_shape", lambda call: call.q[:, :, :1])
    q, k, v = qkv()
    out = genesis_core.attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    (row,) = autotune.timings().values()
    assert row["chosen"] not in ("wrong_fast", "nan_out", "raises", "bad_shape")
    assert dispatch.last_backend() == row["chosen"]
    rej = row["rejected"]
    assert "relative error" in rej["wrong_fast"] and "tolerance 0.001" in rej["wrong_fast"]
    assert "NaN" in rej["nan_out"]
    assert "kernel exploded" in rej["raises"]
    assert "wrong output" in rej["bad_shape"]


def test_slightly_wrong_backend_within_its_tolerance_survives(tuner):
    # 0.5% off: rejected under the float32 default (1e-3), kept when the backend declares 1e-2.
    tuner.add("loose", lambda call: dispatch.registry.get("pytorch").run(call) * 1.005,
              tolerance={torch.float32: 1e-2})
    tuner.add("strict", lambda call: dispatch.registry.get("pytorch").run(call) * 1.005)
    q, k, v = qkv()
    genesis_core.attention(q, k, v)
    (row,) = autotune.timings().values()
    assert "loose" in row and "loose" not in row["rejected"]
    assert "relative error" in row["rejected"]["strict"]


def test_masked_calls_are_checked_against_a_masked_reference(tuner):
    tuner.add("ignores_mask", lambda call: dispatch.registry.get("pytorch").run(
        AttentionCall(call.q, call.k, call.v, None, call.scale)))
    q, k, v = qkv(b=2, nq=20, nk=16)
    mask = torch.rand(2, 1, 20, 16) > 0.3
    mask[..., 0] = True
    out = genesis_core.attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    (row,) = autotune.timings().values()
    assert "relative error" in row["rejected"]["ignores_mask"]


def test_fallback_when_every_candidate_fails(tuner):
    tuner.add("broken_a", lambda call: (_ for _ in ()).throw(RuntimeError("no kernel image")))
    tuner.add("broken_b", lambda call: call.q * 0 + 1)
    q, k, v = qkv()
    call = AttentionCall(q, k, v, None, q.shape[-1] ** -0.5)
    assert autotune.choose(call, ["broken_a", "broken_b"]) is None
    row = autotune.timings()[autotune.signature(call)]
    assert row["chosen"] is None
    assert set(row["rejected"]) == {"broken_a", "broken_b"}
    assert "no kernel image" in row["rejected"]["broken_a"]
    # dispatch then applies its default order: the call still works
    # (measure=False: with measuring on, the other servable backends would be measured now and one could win)
    assert dispatch.chain_for("auto", call, measure=False)[0] == dispatch.DEFAULT_AUTO_ORDER[0]


def test_one_thread_measures_a_signature_the_others_wait(tuner, monkeypatch):
    calls = count_measures(monkeypatch)
    q, k, v = qkv(h=3, nq=40, d=24)
    want = reference(q, k, v)
    results, errors = [], []

    def work():
        try:
            results.append(genesis_core.attention(q, k, v))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert len(calls) == 1
    for r in results:
        torch.testing.assert_close(r.double(), want, atol=1e-5, rtol=1e-5)


def test_the_installed_progress_bar_is_used_while_measuring(tuner, monkeypatch):
    updates = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update(self, n):
            updates.append((self.total, n))

    from genesis_core import progress

    monkeypatch.setattr(progress, "_factory", None)
    progress.set_factory(ProgressBar)  # what the ComfyUI pack installs (ComfyUI's ProgressBar)
    q, k, v = qkv(d=40)
    call = AttentionCall(q, k, v, None, q.shape[-1] ** -0.5)
    entry = autotune.measure(call, ["sdpa", "pytorch"])
    assert entry["chosen"] in ("sdpa", "pytorch")
    assert len(updates) == 3 and all(t == 3 for t, _ in updates)


def test_tune_ahead_and_timings_format(tuner):
    q, k, v = qkv(nq=50, nk=50)
    entry = autotune.tune(q, k, v, layout="BHND")
    assert entry["chosen"] is not None and entry["ms"][entry["chosen"]] > 0
    (sig, row) = next(iter(autotune.timings().items()))
    assert sig.startswith("cpu float32 BH2 Nq") and "mask=none BHND" in sig
    assert isinstance(row["rejected"], dict) and all(isinstance(row[n], float) for n in entry["ms"])


def test_explain_never_measures_but_shows_a_measured_choice(tuner, monkeypatch):
    calls = count_measures(monkeypatch)
    q, k, v = qkv(d=48)
    chain = genesis_core.explain(q, k, v)
    assert calls == [] and chain[0]["name"] == dispatch.DEFAULT_AUTO_ORDER[0]
    genesis_core.attention(q, k, v)
    assert len(calls) == 1
    chosen = autotune.timings()[calls[0]]["chosen"]
    assert genesis_core.explain(q, k, v)[0]["name"] == chosen
    assert len(calls) == 1


def test_out_of_memory_rejections_stay_out_of_the_file(tuner):
    def oom(call):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")

    tuner.add("oom_backend", oom)
    q, k, v = qkv(d=56)
    genesis_core.attention(q, k, v)
    (sig, row) = next(iter(autotune.timings().items()))
    assert "out of memory" in row["rejected"]["oom_backend"]
    assert not autotune.cache_path().exists() or sig not in json.loads(autotune.cache_path().read_text())["entries"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autotune_chooses_an_accurate_backend_and_caches_it(tuner, monkeypatch):
    calls = count_measures(monkeypatch)
    autotune.set_mode(None)  # the default: measuring on CUDA
    for nk in (77, 1024):  # SDXL-like cross and self attention
        q, k, v = qkv(b=2, h=10, nq=1024, nk=nk, d=64, dtype=torch.bfloat16)
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        out = genesis_core.attention(q, k, v)
        ref = reference(q, k, v)
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < 2e-2, (dispatch.last_backend(), err)
        genesis_core.attention(q, k, v)
    assert len(calls) == 2
    for sig, row in autotune.timings().items():
        assert sig.startswith("cuda:") and row["chosen"] is not None and row["chosen"] not in row["rejected"]


def test_tune_ahead_on_cpu_is_used_by_auto_in_the_default_mode(tuner, monkeypatch):
    autotune.set_mode(None)
    monkeypatch.delenv("GENESIS_AUTOTUNE", raising=False)
    def rigged(call, names, budget_ms=None):  # a measurement where the (correct) chunked path wins
        return {"chosen": "pytorch", "ms": {n: (0.1 if n == "pytorch" else 1.0) for n in names}, "rejected": {}}

    monkeypatch.setattr(measuring, "measure", rigged)
    q, k, v = qkv(d=72)
    entry = autotune.tune(q, k, v)
    assert entry["chosen"] == "pytorch" != dispatch.DEFAULT_AUTO_ORDER[0]
    calls = count_measures(monkeypatch)
    out = genesis_core.attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert calls == [] and dispatch.last_backend() == entry["chosen"]
    # a new CPU signature is not measured in the default mode
    genesis_core.attention(*qkv(d=88))
    assert calls == []
    monkeypatch.setenv("GENESIS_AUTOTUNE", "0")  # off: the stored choice is ignored too
    dispatch.clear_plans()
    genesis_core.attention(q, k, v)
    assert dispatch.last_backend() == dispatch.DEFAULT_AUTO_ORDER[0]


def test_cpu_calls_never_initialise_cuda_for_the_cache(tuner, monkeypatch):
    # A GPU machine running on CPU (ComfyUI --cpu): reading or writing CPU choices must not create a
    # CUDA context just to learn the GPU names that key the accelerator cache.
    def no_init(*args, **kwargs):
        raise AssertionError("CUDA was initialised by the autotuner's cache")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", no_init)
    monkeypatch.setattr(signatures, "_envs", {})
    autotune.reload()
    q, k, v = qkv(d=24)
    genesis_core.attention(q, k, v)
    assert any(sig.startswith("cpu ") for sig in autotune.timings())
    assert autotune.cache_path("cpu").exists()


def test_ties_go_to_the_default_order_and_clear_wins_to_the_winner():
    from genesis_core.attn.autotune import TIE_MARGIN, pick, prefer_default

    ms = {"sdpa_cudnn": 1.00, "sdpa": 1.00 + TIE_MARGIN / 2, "flash": 1.8}
    assert prefer_default(ms, list(ms)) == "sdpa"
    ms["sdpa"] = 1.00 + 2 * TIE_MARGIN
    assert prefer_default(ms, list(ms)) == "sdpa_cudnn"
    entry = {"ms": {"sdpa_cudnn": 1.0, "sdpa": 1.01}, "rejected": {"sdpa": "inaccurate"}}
    assert pick(entry, ["sdpa", "sdpa_cudnn"]) == "sdpa_cudnn"
    assert pick(entry, ["sdpa"]) is None


def test_transient_rejections_do_not_make_a_signature_known():
    entry = {"ms": {"sdpa": 1.0}, "rejected": {"sdpa_math": "not measured: tuning budget of 4000 ms spent",
                                              "flash": "inaccurate: rel err 0.3 over 0.02"}}
    assert not autotune.known(entry, ["sdpa", "sdpa_math", "flash"])
    assert autotune.known(entry, ["sdpa", "flash"])


def test_a_transient_skip_is_measured_alone_later_and_merged(tuner, monkeypatch):
    """A backend skipped for a transient reason (memory guard, spent budget) is measured by itself the next
    time a call in that bucket plans, and merged into the entry; the others are not measured again."""
    seen = []
    real = autotune.measure
    monkeypatch.setattr(measuring, "measure", lambda call, names, budget_ms=None: (seen.append(list(names)),
                                                                                 real(call, names, budget_ms))[1])
    guard = {"on": True}
    real_guard = measuring._memory_guard
    monkeypatch.setattr(measuring, "_memory_guard", lambda name, call: (
        "not measured: test memory guard" if guard["on"] and name == "sdpa_math" else real_guard(name, call)))
    nq = int(torch.randint(25, 33, ()))
    q, k, v = qkv(nq=nq)
    out = genesis_core.attention(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(seen) == 1 and "sdpa_math" in seen[0] and len(seen[0]) >= 3, seen
    sig = autotune.signature(AttentionCall(q, k, v, None, 0.25))
    first = dict(autotune.lookup(sig))
    assert "sdpa_math" in first["rejected"] and "sdpa_math" not in first["ms"]
    guard["on"] = False
    q2, k2, v2 = qkv(nq=nq - 1 if nq > 25 else nq + 1)  # another exact shape, the same bucket: a new plan
    assert autotune.signature(AttentionCall(q2, k2, v2, None, 0.25)) == sig
    out = genesis_core.attention(q2, k2, v2)
    torch.testing.assert_close(out.double(), reference(q2, k2, v2), atol=1e-5, rtol=1e-5)
    assert len(seen) == 2 and seen[1][0] == "sdpa_math" and seen[1][1:] == [first["chosen"]], seen
    merged = autotune.lookup(sig)
    assert "sdpa_math" in merged["ms"] and "sdpa_math" not in merged["rejected"]
    kept = [n for n in first["ms"] if n != first["chosen"]]
    assert {n: merged["ms"][n] for n in kept} == {n: first["ms"][n] for n in kept}, "other timings are kept"
    assert merged["ranking"] == sorted(merged["ms"], key=merged["ms"].get)
    dispatch.clear_plans()  # known now: a new plan in this bucket measures nothing
    genesis_core.attention(*qkv(nq=nq))
    assert len(seen) == 2, seen


def test_merge_replaces_what_was_measured_again():
    old = {"ms": {"a": 1.0, "b": 2.0}, "rejected": {"c": "not measured: budget", "d": "inaccurate"},
           "rel_err": {"a": 1e-3}, "notes": {"c": "x"}, "shape": "s", "when": "t0"}
    fresh = {"ms": {"c": 0.5}, "rejected": {}, "rel_err": {"c": 2e-3}, "notes": {}, "when": "t1"}
    m = autotune.merge(old, fresh)
    assert m["ms"] == {"c": 0.5, "a": 1.0, "b": 2.0} and m["ranking"] == ["c", "a", "b"]
    assert m["rejected"] == {"d": "inaccurate"} and m["notes"] == {} and m["shape"] == "s" and m["when"] == "t1"
    assert autotune.merge(old, {**fresh, "shape": "s2"})["shape"] == "s2"
    assert m["chosen"] == autotune.prefer_default(m["ms"], m["ranking"])
    again = autotune.merge(m, {"ms": {}, "rejected": {"a": "failed while timing: boom"}})
    assert "a" not in again["ms"] and again["rejected"]["a"].startswith("failed")
