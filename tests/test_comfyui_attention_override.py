"""The Genesis override against ComfyUI's attention calling convention (no ComfyUI needed).

Every combination of skip_reshape, skip_output_reshape, mask shape, head count and CPU backend is
compared to a float64 reading of ComfyUI's ``attention_basic``.
"""
from __future__ import annotations

import copy
import importlib
import itertools
import logging

import pytest
import torch

from comfy_helpers import attention_basic_reference, load_pack
from conftest import reference_attention

pack = load_pack()
interop = importlib.import_module(pack.__name__ + ".genesis_core.interop")
engine = importlib.import_module(pack.__name__ + ".genesis_core.attn.dispatch")
attn_pkg = importlib.import_module(pack.__name__ + ".genesis_core.attn")

B, NQ, NK, D = 2, 7, 5, 8

MASKS = {
    "none": None,
    "float_NqNk": lambda b, h: torch.randn(NQ, NK),
    "float_1Nk": lambda b, h: torch.randn(1, NK),
    "float_BNqNk": lambda b, h: torch.randn(b, NQ, NK),
    "float_B1Nk": lambda b, h: torch.randn(b, 1, NK),
    "float_BHNqNk": lambda b, h: torch.randn(b, h, NQ, NK),
    "float_B1NqNk": lambda b, h: torch.randn(b, 1, NQ, NK),
    "float_neg_inf_keys": lambda b, h: torch.zeros(b, 1, NK).masked_fill(torch.arange(NK) >= NK - 2, float("-inf")),
    "bool_B1Nk": lambda b, h: torch.arange(NK).expand(b, 1, NK) < torch.tensor([NK, 3][:b]).view(b, 1, 1),
    "bool_B11Nk": lambda b, h: (torch.arange(NK).expand(b, 1, 1, NK) < torch.tensor([2, NK][:b]).view(b, 1, 1, 1)),
}


def _cpu_backends():
    names = ["auto"]
    for row in attn_pkg.backends_report():
        if row["available"] and row["name"] in ("sdpa", "pytorch", "flash", "xformers", "sage"):
            names.append(row["name"])
    return names


def _inputs(heads, skip_reshape, dv=D):
    gen = torch.Generator().manual_seed(heads * 31 + int(skip_reshape))
    if skip_reshape:
        q = torch.randn(B, heads, NQ, D, generator=gen)
        k = torch.randn(B, heads, NK, D, generator=gen)
        v = torch.randn(B, heads, NK, dv, generator=gen)
    else:
        q = torch.randn(B, NQ, heads * D, generator=gen)
        k = torch.randn(B, NK, heads * D, generator=gen)
        v = torch.randn(B, NK, heads * dv, generator=gen)
    return q, k, v


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("skip_reshape,skip_output_reshape", list(itertools.product([False, True], repeat=2)))
def test_override_matches_attention_basic(backend, mask_kind, heads, skip_reshape, skip_output_reshape):
    q, k, v = _inputs(heads, skip_reshape)
    make = MASKS[mask_kind]
    mask = None if make is None else make(B, heads)
    seen = {}

    def original(*args, **kwargs):  # must not run: Genesis serves these calls
        seen["called"] = True
        raise AssertionError("the original ComfyUI function ran although Genesis can serve this call")

    override = interop.GenesisAttentionOverride(backend)
    kwargs = dict(attn_precision=None, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                  transformer_options={"block": ("input", 1)}, _inside_attn_wrapper=True)
    if mask is None:
        out = override(original, q, k, v, heads, **kwargs)
    else:
        out = override(original, q, k, v, heads, mask, **kwargs)  # ComfyUI passes the mask positionally
    ref = attention_basic_reference(q, k, v, heads, mask, skip_reshape, skip_output_reshape)

    assert "called" not in seen
    assert out.dtype == q.dtype
    assert tuple(out.shape) == tuple(ref.shape)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert override.calls == 1 and override.fallback_calls == 0
    if backend != "auto":
        served = list(override.run_table()[0][1])
        assert served[0] in (backend, "sdpa", "pytorch")


def test_output_layout_is_what_comfy_expects():
    heads = 4
    q, k, v = _inputs(heads, False, dv=6)  # Dv != D
    out = interop.comfy_attention(q, k, v, heads)
    assert out.shape == (B, NQ, heads * 6)
    out4 = interop.comfy_attention(q, k, v, heads, skip_output_reshape=True)
    assert out4.shape == (B, heads, NQ, 6)
    torch.testing.assert_close(out4.permute(0, 2, 1, 3).reshape(B, NQ, -1), out)
    torch.testing.assert_close(out.double(), attention_basic_reference(q, k, v, heads), rtol=1e-4, atol=1e-5)


def test_keyword_arguments_and_unknown_kwargs_are_accepted():
    heads = 2
    q, k, v = _inputs(heads, False)
    mask = torch.randn(B, NQ, NK)
    override = interop.GenesisAttentionOverride("sdpa")
    out = override(lambda *a, **kw: None, q=q, k=k, v=v, heads=heads, mask=mask, some_future_flag=3,
                   transformer_options={}, _inside_attn_wrapper=True)
    torch.testing.assert_close(out.double(), attention_basic_reference(q, k, v, heads, mask), rtol=1e-4, atol=1e-5)


def test_unservable_call_falls_back_to_original_with_untouched_arguments(caplog):
    heads = 2
    q, k, v = _inputs(heads, False)
    bad_mask = torch.randn(1, 1, 1, NQ, NK)  # 5-D: outside what Genesis accepts
    got = {}

    def original(*args, **kwargs):
        got["args"], got["kwargs"] = args, kwargs
        return torch.full((B, NQ, heads * D), 7.0)

    override = interop.GenesisAttentionOverride("sdpa")
    opts = {"x": 1}
    out = override(original, q, k, v, heads, bad_mask, attn_precision=None, transformer_options=opts,
                   _inside_attn_wrapper=True, extra="kept")
    assert torch.equal(out, torch.full((B, NQ, heads * D), 7.0))
    assert got["args"][4] is bad_mask and got["args"][0] is q
    assert got["kwargs"]["transformer_options"] is opts and got["kwargs"]["extra"] == "kept"
    assert got["kwargs"]["_inside_attn_wrapper"] is True
    assert override.fallback_calls == 1 and override.calls == 1
    assert override.run_table()[0][1] == {"comfy:original": 1}


def test_bad_heads_and_rank_read_like_sentences():
    q, k, v = _inputs(3, False)
    with pytest.raises(ValueError, match="divisible by heads=5"):
        interop.comfy_attention(q, k, v, 5)
    with pytest.raises(ValueError, match="must be 4-D"):
        interop.comfy_attention(q, k, v, 3, skip_reshape=True)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        interop.comfy_attention(q, k, v, 0)


def test_attn_precision_float32_upcasts_half_inputs_on_plain_math():
    heads = 2
    q, k, v = (t * 4 for t in _inputs(heads, False))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref = attention_basic_reference(qb, kb, vb, heads)
    out = interop.comfy_attention(qb, kb, vb, heads, attn_precision=torch.float32, backend="pytorch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_deepcopy_keeps_one_override_and_end_run_logs_each_signature(caplog):
    override = interop.GenesisAttentionOverride("sdpa")
    assert copy.deepcopy({"o": override})["o"] is override
    for heads in (2, 4):
        q, k, v = _inputs(heads, False)
        override(lambda *a, **k: None, q, k, v, heads)
        override(lambda *a, **k: None, q, k, v, heads)
    logger = logging.getLogger("genesis")
    logger.addHandler(caplog.handler)
    try:
        table = override.end_run("test run")
    finally:
        logger.removeHandler(caplog.handler)
    assert len(table) == 2 and all(sum(c.values()) == 2 for _, c in table)
    assert "2 call signature(s)" in caplog.text and "H=4" in caplog.text
    assert override.run_table() == []


def test_replace_patch_matches_reference():
    heads = 4
    q, k, v = _inputs(heads, False)
    override = interop.GenesisAttentionOverride("pytorch")
    patch = interop.make_replace_patch(override)
    out = patch(q, k, v, {"n_heads": heads, "dim_head": D, "attn_precision": None})
    torch.testing.assert_close(out.double(), attention_basic_reference(q, k, v, heads), rtol=1e-4, atol=1e-5)
    assert override.calls == 1


# ---------------------------------------------------------------- the prepared (cached) path

adapter = importlib.import_module(pack.__name__ + ".genesis_core.interop.comfy_adapter")  # where the override looks up the full path
registry = importlib.import_module(pack.__name__ + ".genesis_core.attn.registry")
Backend = registry.Backend


def _forbid_full_path(monkeypatch):
    """Make every step of the full path (binding, signature, checks, planning) raise."""
    def forbidden(name):
        def fn(*a, **k):
            raise AssertionError(f"{name} ran on a call signature the override has seen before")
        return fn

    monkeypatch.setattr(adapter, "comfy_attention", forbidden("comfy_attention"))
    monkeypatch.setattr(adapter, "bind_arguments", forbidden("bind_arguments"))
    monkeypatch.setattr(adapter, "call_signature", forbidden("call_signature"))
    monkeypatch.setattr(engine, "validate", forbidden("validate"))
    monkeypatch.setattr(engine, "_plan", forbidden("the engine's planning"))


CALL_FORMS = {
    # how ComfyUI's models call optimized_attention: heads positional (SD/Flux), by name (Wan), mask None
    # positionally (optimized_attention_masked callers), flags by name
    "heads_positional": lambda q, k, v, h, kw: ((q, k, v, h), kw),
    "heads_by_name": lambda q, k, v, h, kw: ((q, k, v), dict(kw, heads=h)),
    "mask_none_positional": lambda q, k, v, h, kw: ((q, k, v, h, None), kw),
}


@pytest.mark.parametrize("backend", ["auto", "sdpa", "pytorch"])
@pytest.mark.parametrize("form", list(CALL_FORMS))
@pytest.mark.parametrize("skip_reshape,skip_output_reshape", list(itertools.product([False, True], repeat=2)))
def test_second_call_takes_the_prepared_path(monkeypatch, backend, form, skip_reshape, skip_output_reshape):
    heads = 3
    override = interop.GenesisAttentionOverride(backend)
    flags = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                 transformer_options={}, _inside_attn_wrapper=True)

    def original(*a, **k):
        raise AssertionError("ComfyUI's function ran although Genesis serves these calls")

    args, kw = CALL_FORMS[form](*_inputs(heads, skip_reshape), heads, flags)
    override(original, *args, **kw)  # first call: checked and planned
    _forbid_full_path(monkeypatch)
    for _ in range(2):
        q, k, v = (torch.randn_like(t) for t in _inputs(heads, skip_reshape))  # fresh data, same signature
        args, kw = CALL_FORMS[form](q, k, v, heads, flags)
        out = override(original, *args, **kw)
        ref = attention_basic_reference(q, k, v, heads, None, skip_reshape, skip_output_reshape)
        assert tuple(out.shape) == tuple(ref.shape)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert override.calls == 3 and override.fallback_calls == 0
    (sig, served), = override.run_table()
    assert sum(served.values()) == 3 and set(served) <= {backend, "sdpa", "pytorch"}, served


def test_a_new_signature_level_or_registry_change_takes_the_full_path(monkeypatch):
    heads = 2
    override = interop.GenesisAttentionOverride("auto")
    seen = []
    real = adapter.comfy_attention
    monkeypatch.setattr(adapter, "comfy_attention", lambda *a, **k: (seen.append(k.get("quality")), real(*a, **k))[1])
    q, k, v = _inputs(heads, False)
    for _ in range(3):
        override(None, q, k, v, heads)
    assert seen == [None]
    override(None, q[:, :5].contiguous(), k, v, heads)  # another query length
    assert len(seen) == 2
    override.level = "high"  # what begin_model_call sets for a step
    override(None, q, k, v, heads)
    override(None, q, k, v, heads)
    assert seen[2:] == ["high"]
    registry.changed()  # e.g. the autotuner cleared or a backend re-probed: plans may be stale
    override(None, q, k, v, heads)
    assert len(seen) == 4
    override.level = None  # the engine's default level, which can change underneath
    override(None, q, k, v, heads)
    engine.set_default_quality("fast")
    try:
        override(None, q, k, v, heads)
    finally:
        engine.set_default_quality(None)
    override(None, q, k, v, heads)
    assert len(seen) == 5 + 1 and seen[4:] == [None, None]
    seen[:] = seen[:4]
    # An input a view cannot split: prepared too, with a copy where ComfyUI's own view would fail.
    qt = torch.randn(B, heads * D, NQ).transpose(1, 2)
    out1 = override(None, qt, k, v, heads)
    out2 = override(None, qt, k, v, heads)
    assert len(seen) == 5
    ref = attention_basic_reference(qt, k, v, heads)
    torch.testing.assert_close(out1.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out2.double(), ref, rtol=1e-4, atol=1e-5)


def test_the_prepared_path_follows_what_auto_resolves_to_now():
    """A prepared kernel was chosen for ``auto`` as it resolved then: a ``use_backend`` block in this thread, a new
    process default or another AUTO chooser (the autotuner uninstalled or replaced) must take effect at once."""
    heads = 2
    override = interop.GenesisAttentionOverride("auto")
    counted = {"n": 0}

    def counting_kernel(q, k, v):
        counted["n"] += 1
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    registry.register(Backend(name="chosen_override_test", probe=lambda: None, description=lambda: "test",
                              run=lambda call: counting_kernel(call.q, call.k, call.v),
                              direct=lambda call: counting_kernel))
    try:
        def served():
            """The backend that served the override's next call (from its run table), checked against float64."""
            before = dict(override.run_table()[0][1]) if override.run_table() else {}
            q, k, v = (torch.randn_like(t) for t in _inputs(heads, False))
            out = override(None, q, k, v, heads)
            torch.testing.assert_close(out.double(), attention_basic_reference(q, k, v, heads), rtol=1e-4, atol=1e-5)
            after = override.run_table()[0][1]
            (name,) = [n for n in after if after[n] != before.get(n, 0)]
            return name

        default = served()  # planned
        assert served() == default != "pytorch"  # prepared
        with attn_pkg.use_backend("pytorch"):
            assert [served(), served()] == ["pytorch", "pytorch"]
        assert served() == default
        engine.set_default_backend("pytorch")
        try:
            assert [served(), served()] == ["pytorch", "pytorch"]
        finally:
            engine.set_default_backend("auto")
        assert served() == default
        engine.set_auto_chooser(lambda call, names, level: "chosen_override_test")
        try:
            before = counted["n"]
            assert [served(), served()] == ["chosen_override_test"] * 2
            assert counted["n"] == before + 2
        finally:
            attn_pkg.install_autotuner()
        assert served() == default
    finally:
        registry.unregister("chosen_override_test")
        engine.clear_plans()


def test_a_call_that_needs_a_backward_never_takes_a_forward_only_prepared_kernel():
    """Grad enabled, a first call whose inputs need no grad prepares a forward-only kernel; a later call of the same
    shapes whose q requires grad must get gradients (the full path refuses the kernel and falls back)."""
    heads = 2

    def forward_only(q, k, v):
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    limits = importlib.import_module(pack.__name__ + ".genesis_core.attn.limits")
    registry.register(Backend(name="forward_only_test", probe=lambda: None, description=lambda: "test",
                              run=lambda call: forward_only(call.q, call.k, call.v),
                              limits=limits.Limits(autograd=False), direct=lambda call: forward_only))
    try:
        override = interop.GenesisAttentionOverride("forward_only_test")
        with torch.enable_grad():
            for _ in range(2):
                q, k, v = (torch.randn_like(t) for t in _inputs(heads, False))
                override(None, q, k, v, heads)  # planned, then prepared: the forward-only kernel
            assert override.run_table()[0][1] == {"forward_only_test": 2}
            q, k, v = (torch.randn_like(t) for t in _inputs(heads, False))
            qg = q.clone().requires_grad_(True)
            out = override(None, qg, k, v, heads)
            assert out.requires_grad
            weights = torch.randn_like(out)
            (out * weights).sum().backward()
            q64 = q.double().requires_grad_(True)

            def heads_of(t):  # [B, N, H*D] -> [B, H, N, D]
                return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

            ref = reference_attention(heads_of(q64), heads_of(k), heads_of(v)).transpose(1, 2).reshape(out.shape)
            (ref * weights.double()).sum().backward()
        torch.testing.assert_close(out.double(), attention_basic_reference(q, k, v, heads), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(qg.grad.double(), q64.grad, rtol=1e-3, atol=1e-4)
    finally:
        registry.unregister("forward_only_test")
        engine.clear_plans()


def test_a_failing_direct_kernel_moves_the_signature_to_the_engine(genesis_log):
    """The prepared path calls the served backend's plain kernel; when that raises, this call and every later
    one with the signature go through the engine, which logs the failure and falls back."""
    state = {"direct_calls": 0, "run_calls": 0}

    def direct_kernel(q, k, v):
        state["direct_calls"] += 1
        if state["direct_calls"] > 1:  # works while dispatch plans, breaks on the override's prepared call
            raise RuntimeError("direct kernel exploded")
        return registry.get("pytorch").run(AttentionCall(q, k, v, None, q.shape[-1] ** -0.5))

    def run(call):
        state["run_calls"] += 1
        return registry.get("pytorch").run(call)

    AttentionCall = importlib.import_module(pack.__name__ + ".genesis_core.attn.types").AttentionCall
    registry.register(Backend(name="direct_override_test", probe=lambda: None, unsupported=lambda c: None, run=run,
                              description=lambda: "test", direct=lambda call: direct_kernel))
    try:
        engine.clear_plans()
        heads = 2
        override = interop.GenesisAttentionOverride("direct_override_test")
        q, k, v = _inputs(heads, False)
        ref = attention_basic_reference(q, k, v, heads)
        for _ in range(4):
            out = override(None, q, k, v, heads)
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        # call 1: dispatch's direct path; call 2: the override's direct call fails, the engine's too (logged),
        # then run(call); calls 3-4: the engine, whose plan no longer takes the direct path.
        assert state["direct_calls"] == 3 and state["run_calls"] == 3, state
        assert override.fallback_calls == 0 and override.calls == 4
        assert any("direct path of attention backend 'direct_override_test' failed" in m for m in genesis_log)
    finally:
        registry.unregister("direct_override_test")
        engine.clear_plans()


# ---------------------------------------------------------------- the overhead bench's ComfyUI path


@pytest.mark.parametrize("mask_kind", ["none", "float_NqNk", "float_BNqNk", "float_BHNqNk"])
@pytest.mark.parametrize("skip_reshape,skip_output_reshape", list(itertools.product([False, True], repeat=2)))
def test_bench_reproduces_comfy_attention_pytorch(mask_kind, skip_reshape, skip_output_reshape):
    """The bench's stand-in for ComfyUI's attention_pytorch keeps its contract, and hands the call to an
    override in transformer_options the way ComfyUI's wrap_attn does (the override sees the flag set)."""
    from genesis_core.bench.overhead import reproduced_attention_pytorch

    fn = reproduced_attention_pytorch(torch.device("cpu"))
    heads = 3
    q, k, v = _inputs(heads, skip_reshape)
    make = MASKS[mask_kind]
    mask = None if make is None else make(B, heads)
    flags = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    ref = attention_basic_reference(q, k, v, heads, mask, skip_reshape, skip_output_reshape)
    torch.testing.assert_close(fn(q, k, v, heads, mask, transformer_options={}, **flags).double(), ref,
                               rtol=1e-4, atol=1e-5)
    seen = {}

    def override(func, *args, **kwargs):
        seen.update(func=func, inside=kwargs.get("_inside_attn_wrapper"))
        return func(*args, **kwargs)  # the original again: must not recurse into the override

    out = fn(q, k, v, heads, mask, transformer_options={"optimized_attention_override": override}, **flags)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert seen["inside"] is True and seen["func"] is not fn


def test_bench_override_rows():
    from genesis_core.bench.overhead import bench_comfy_override
    from genesis_core.bench.verdicts import comfy_override_verdicts

    rows = bench_comfy_override([torch.device("cpu")], calls=20, rounds=2)
    assert [(r["path"], r["genesis"]) for r in rows] == [("reproduced", False), ("reproduced", True)]
    assert rows[0]["overhead_us"] == 0.0 and rows[1]["overhead_us"] == rows[1]["us_per_call"] - rows[0]["us_per_call"]
    assert rows[1]["chosen"] in ("sdpa", "pytorch")
    (device, path, ok, over), = comfy_override_verdicts(rows)
    assert device == "cpu" and path == "reproduced" and ok is (over <= 5.0)
