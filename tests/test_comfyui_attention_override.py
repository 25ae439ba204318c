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

pack = load_pack()
interop = importlib.import_module(pack.__name__ + ".genesis_core.interop")
engine = importlib.import_module(pack.__name__ + ".genesis_core.attn.dispatch")

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
    for row in engine.backends_report():
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
