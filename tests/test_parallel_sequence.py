"""Sequence-parallel attention (Ulysses, ring, both; joint tokens; uneven shards; key masks) on 2 and 4 gloo
processes against float64 single-process attention over the whole sequence, on hypothesis-drawn shapes."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import reference_attention
from genesis_core.parallel import build_mesh, mesh_ranks, sequence_attention, shard_sizes, split_tokens
from genesis_core.parallel.launch import LocalProcessGroup, WorkerFailed
from genesis_core.parallel.shard import unpad_tokens

# ---------------------------------------------------------------- run inside the worker processes


def _mesh(ctx, ulysses, ring):
    key = ("mesh", ulysses, ring)
    if key not in ctx.cache:
        ctx.cache[key] = build_mesh(cfg=1, ulysses=ulysses, ring=ring)
    return ctx.cache[key]


def _shard_attention(ctx, q, k, v, case, mask=None):
    """This rank's shard of the middle tokens (+ the joint tokens), through sequence_attention."""
    mesh = _mesh(ctx, case["ulysses"], case["ring"])
    jf, jb = case["jf"], case["jb"]
    parts = mesh.sequence_degree

    def local(t):
        mid = t.narrow(2, jf, t.shape[2] - jf - jb)
        shard, length, real = split_tokens(mid, mesh.shard_index, parts, dim=2, minimum=case["minimum"])
        return torch.cat((t.narrow(2, 0, jf), shard, t.narrow(2, t.shape[2] - jb, jb)), dim=2), real

    (ql, real), (kl, _), (vl, _) = local(q), local(k), local(v)
    if case["layout"] == "BNHD":
        ql, kl, vl = ql.transpose(1, 2), kl.transpose(1, 2), vl.transpose(1, 2)
    out = sequence_attention(ql, kl, vl, mesh, real=real, joint_front=jf, joint_back=jb, layout=case["layout"],
                             ring_impl=case["ring_impl"], scale=case["scale"], mask=mask,
                             backend=case.get("backend", "auto"), quality=case.get("quality"))
    if case["layout"] == "BNHD":
        out = out.transpose(1, 2)
    return mesh.shard_index, out.contiguous(), real


_FAKE = "fp8_seq_test"
_FAKE_RUNS = []


def _recorded_attention(ctx, q, k, v, case, mask=None):
    """:func:`_shard_attention` with a lossy-class (fp8) test backend registered that records its runs (it
    computes exact SDPA, so the accuracy guard lets it serve where the budget admits it); also returns how often
    it ran on this rank and {quality level: backend} of every call signature dispatch planned for it (a fresh
    backend name per call, so only this call's signatures match)."""
    from genesis_core.attn import dispatch, registry
    from genesis_core.attn.registry import Backend

    name = f"{_FAKE}_{ctx.cache.setdefault('fake_calls', [0])[0]}"
    ctx.cache["fake_calls"][0] += 1
    registry.register(Backend(name=name, probe=lambda: None, description=lambda: "recording test kernel",
                              run=lambda call: (_FAKE_RUNS.append(1), registry.get("sdpa").run(call))[1],
                              precision="fp8"))
    before = len(_FAKE_RUNS)
    try:
        result = _shard_attention(ctx, q, k, v, dict(case, backend=name), mask)
    finally:
        registry.unregister(name)
    levels = {sig.split("quality=")[1]: ("fake" if served == name else served)
              for sig, served in dispatch.served_signatures().items() if f"requested={name} " in sig}
    return (*result, len(_FAKE_RUNS) - before, levels)


def _raises(ctx, q, k, v, case, mask=None):
    mesh = _mesh(ctx, case["ulysses"], case["ring"])
    try:
        sequence_attention(q, k, v, mesh, mask=mask)
    except ValueError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pool2():
    with LocalProcessGroup(2, timeout_s=60) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool4():
    with LocalProcessGroup(4, timeout_s=60) as pool:
        yield pool


def _check_case(pool, case, seed, fn=_shard_attention):
    gen = torch.Generator().manual_seed(seed)
    b, h, hk, d, n, jf, jb = (case[x] for x in ("b", "h", "hk", "d", "n", "jf", "jb"))
    dtype = case["dtype"]
    total = jf + n + jb
    q = torch.randn(b, h, total, d, generator=gen).to(dtype)
    k = torch.randn(b, hk, total, d, generator=gen).to(dtype)
    v = torch.randn(b, hk, total, d, generator=gen).to(dtype)
    mask = _draw_mask(gen, case.get("mask"), b, h, total)
    ref = reference_attention(q, k, v, mask=mask, scale=case["scale"])  # float64, the whole sequence, one process
    results = pool.run(fn, q, k, v, case, mask)
    parts = case["ulysses"] * case["ring"]
    length = max(math.ceil(n / parts), case["minimum"])
    by_shard = {r[0]: (r[1], r[2]) for r in results}
    assert sorted(by_shard) == list(range(parts))
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    middle = []
    for i in range(parts):
        out, real = by_shard[i]
        assert out.shape == (b, h, jf + length + jb, d)
        assert torch.isfinite(out).all()
        start = min(i * length, n)
        count = min(length, max(0, n - i * length))
        assert real[i] == count
        # joint tokens: the same on every rank, equal to the whole-sequence result
        torch.testing.assert_close(out[:, :, :jf].double(), ref[:, :, :jf], atol=tol, rtol=tol)
        torch.testing.assert_close(out[:, :, jf + length:].double(), ref[:, :, jf + n:], atol=tol, rtol=tol)
        torch.testing.assert_close(out[:, :, jf:jf + count].double(), ref[:, :, jf + start:jf + start + count],
                                   atol=tol, rtol=tol)
        middle.append(out[:, :, jf:jf + length])
    # every token exactly once: the real rows of all shards put back together are the whole middle
    joined = unpad_tokens(torch.cat(middle, dim=2), by_shard[0][1], dim=2)
    assert joined.shape[2] == n
    torch.testing.assert_close(joined.double(), ref[:, :, jf:jf + n], atol=tol, rtol=tol)
    for i in range(1, parts):  # joint rows bit-identical across ranks (replicated state must not drift)
        assert torch.equal(by_shard[i][0][:, :, :jf], by_shard[0][0][:, :, :jf])
        assert torch.equal(by_shard[i][0][:, :, jf + length:], by_shard[0][0][:, :, jf + length:])
    return results


def _draw_mask(gen, kind, b, h, keys):
    """A key mask over the whole sequence: ``bool`` [keys] (one key always kept), ``additive`` [B, 1, keys] with
    a few -inf, ``heads`` [B, H, 1, keys]."""
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(keys, generator=gen) < 0.6
        m[torch.randint(keys, (1,), generator=gen)] = True
        return m
    if kind == "additive":
        m = torch.randn(b, 1, keys, generator=gen) * 2
        drop = torch.rand(b, 1, keys, generator=gen) < 0.3
        drop[..., torch.randint(keys, (1,), generator=gen)] = False
        return m.masked_fill(drop, float("-inf"))
    return torch.randn(b, h, 1, keys, generator=gen) * 2


def _cases(world):
    meshes = [(u, world // u) for u in (1, 2, 4) if world % u == 0 and u <= world]

    @st.composite
    def case(draw):
        u, r = draw(st.sampled_from(meshes))
        h = u * draw(st.integers(1, 3))
        hk = draw(st.sampled_from([x for x in (1, h // 2 if h % 2 == 0 else h, h) if x and h % x == 0]))
        return {
            "ulysses": u, "ring": r, "b": draw(st.integers(1, 2)), "h": h, "hk": hk,
            "d": draw(st.sampled_from([4, 8, 16])), "n": draw(st.integers(1, 23)),
            "jf": draw(st.sampled_from([0, 0, 3])), "jb": draw(st.sampled_from([0, 0, 2])),
            "minimum": draw(st.sampled_from([0, 0, 9])),
            "layout": draw(st.sampled_from(["BHND", "BNHD"])),
            "ring_impl": draw(st.sampled_from(["ring", "allgather"])),
            "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
            "scale": draw(st.sampled_from([None, 0.3])),
            "mask": draw(st.sampled_from([None, None, "bool", "additive", "heads"])),
        }

    return case()


_SETTINGS = settings(max_examples=14, deadline=None, derandomize=False,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(case=_cases(2), seed=st.integers(0, 2**31 - 1))
def test_two_processes_match_one(pool2, case, seed):
    _check_case(pool2, case, seed)


@_SETTINGS
@given(case=_cases(4), seed=st.integers(0, 2**31 - 1))
def test_four_processes_match_one(pool4, case, seed):
    _check_case(pool4, case, seed)


@pytest.mark.parametrize("ulysses,ring,mask", [(4, 1, None), (2, 2, None), (1, 4, None), (2, 2, "additive"),
                                               (1, 4, "heads")])
def test_uneven_tiny_sequence_on_four_ranks(pool4, ulysses, ring, mask):
    """5 tokens on 4 ranks: shards of 2, 2, 1 and 0 real tokens; nothing dropped, nothing doubled."""
    case = {"ulysses": ulysses, "ring": ring, "b": 1, "h": 4, "hk": 4, "d": 8, "n": 5, "jf": 2, "jb": 1,
            "minimum": 0, "layout": "BHND", "ring_impl": "ring", "dtype": torch.float64, "scale": None,
            "mask": mask}
    _check_case(pool4, case, seed=1234)


def test_heads_that_do_not_divide_are_refused_with_a_sentence(pool4):
    q = torch.randn(1, 6, 5, 8)  # 6 heads on 4 Ulysses ranks
    messages = pool4.run(_raises, q, q, q, {"ulysses": 4, "ring": 1})
    assert all(m is not None and "6 attention heads do not divide among 4 Ulysses ranks" in m for m in messages)


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)])
def test_a_mask_only_on_the_joint_keys_on_two_ranks(pool2, ulysses, ring):
    """HunyuanVideo's case: image shards unmasked, some text keys (joint, behind) masked out."""
    case = {"ulysses": ulysses, "ring": ring, "b": 1, "h": 2, "hk": 2, "d": 8, "n": 9, "jf": 0, "jb": 5,
            "minimum": 0, "layout": "BNHD", "ring_impl": "ring", "dtype": torch.float64, "scale": None,
            "mask": None}
    mask = torch.zeros(1, 1, 14)
    mask[..., 11:] = -torch.finfo(torch.float32).max  # what ComfyUI's HunyuanVideo builds from its text mask
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 14, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = reference_attention(q, k, v, mask=mask)
    outs = {i: (o, real) for i, o, real in pool2.run(_shard_attention, q, k, v, case, mask)}
    joined = unpad_tokens(torch.cat([outs[i][0][:, :, :5] for i in range(2)], dim=2), outs[0][1], dim=2)
    torch.testing.assert_close(joined, ref[:, :, :9], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(outs[1][0][:, :, 5:], ref[:, :, 9:], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("ulysses,ring,ring_impl", [(2, 1, "ring"), (1, 2, "allgather"), (1, 2, "ring")])
def test_the_quality_level_reaches_every_local_attention_call(pool2, ulysses, ring, ring_impl):
    """``quality`` governs the Genesis calls of the Ulysses and allgather paths (an explicit fp8-class backend
    is refused at exact and serves at fast, on every rank); ring blocks run on SDPA whatever it says."""
    for quality, mask in (("exact", None), ("fast", None), ("fast", "additive"), ("high", None)):
        case = {"ulysses": ulysses, "ring": ring, "b": 1, "h": 2, "hk": 2, "d": 8, "n": 11, "jf": 3, "jb": 0,
                "minimum": 0, "layout": "BNHD", "ring_impl": ring_impl, "dtype": torch.float32, "scale": None,
                "mask": mask, "backend": _FAKE, "quality": quality}
        results = _check_case(pool2, case, seed=21, fn=_recorded_attention)
        for _, _, _, runs, levels in results:
            if ring > 1 and ring_impl == "ring":
                assert runs == 0 and levels == {}
            elif quality == "fast":
                assert runs >= 1 and levels == {"fast": "fake"}  # the guard's checked run, then the call
            else:
                assert runs == 0 and levels == {quality: "sdpa"}


def test_masks_that_differ_per_query_are_refused_with_a_sentence(pool2):
    q = torch.randn(1, 2, 5, 8)
    messages = pool2.run(_raises, q, q, q, {"ulysses": 2, "ring": 1}, torch.zeros(1, 10, 10))
    assert all(m is not None and "differs per query cannot be split" in m for m in messages)


def test_mesh_layout_and_shard_sizes():
    lists = mesh_ranks(cfg=2, ulysses=2, ring=2)
    assert lists["sequence"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lists["ulysses"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lists["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lists["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert shard_sizes(5, 4) == (2, [2, 2, 1, 0])
    assert shard_sizes(32760, 8) == (4095, [4095] * 8)
    assert shard_sizes(10, 2, minimum=7) == (7, [7, 3])
    with pytest.raises(ValueError, match="total must be a positive int"):
        shard_sizes(0, 2)


def test_a_failing_rank_is_named_and_the_next_group_works():
    with LocalProcessGroup(2, timeout_s=30) as pool:
        with pytest.raises(WorkerFailed, match="rank 1 .*died with exit code"):
            pool.run(_die_on_rank_one)
        assert pool.closed
    with LocalProcessGroup(2, timeout_s=30) as pool:
        assert pool.run(_rank_of) == [0, 1]


def _die_on_rank_one(ctx):
    import os

    if ctx.rank == 1:
        os._exit(3)
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits for a peer that is gone
    return ctx.rank


def _rank_of(ctx):
    return ctx.rank
