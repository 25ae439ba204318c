"""HunyuanVideo's modulation ranges (ComfyUI's ``modulation_dims``: ``[(first, end or None, index)]`` over the
token sequence) moved onto each rank's shard by ``local_ranges``: every real token of a shard, and every
replicated text token behind it, must fall in exactly the ranges (in the same order) it falls in over the whole
sequence; padding in none. No ComfyUI needed: the reference is a plain reading of ComfyUI's slice semantics."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from genesis_core.interop.comfy_parallel_models import local_ranges
from genesis_core.parallel.mesh import shard_sizes


def covering(dims, n):
    """For each of ``n`` tokens, the indices of the ranges that modulate it, in order (``x[:, a:b]``)."""
    out = [[] for _ in range(n)]
    for a, b, idx in dims:
        for p in range(n)[slice(a, b)]:
            out[p].append(idx)
    return out


@st.composite
def cases(draw):
    total = draw(st.integers(1, 40))
    tail = draw(st.integers(0, 6))
    parts = draw(st.integers(1, 5))
    n = total + tail
    dims = []
    for i in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, n))
        b = draw(st.one_of(st.none(), st.integers(a, n)))
        dims.append((a, b, i))
    if draw(st.booleans()):  # ComfyUI's own shape: the first frame apart, the rest (text included) together
        frame = draw(st.integers(0, total))
        dims = [(0, frame, 0), (frame, None, 1)]
    return total, tail, parts, dims


@settings(max_examples=300, deadline=None)
@given(cases())
def test_each_shard_modulates_its_tokens_as_the_whole_sequence_does(case):
    total, tail, parts, dims = case
    whole = covering(dims, total + tail)
    length, real = shard_sizes(total, parts)
    for r in range(parts):
        start = min(r * length, total)
        local = local_ranges(dims, start, real[r], length, total, tail)
        got = covering(local, length + tail)
        want = [whole[start + p] for p in range(real[r])] + [[]] * (length - real[r])
        want += [whole[total + p] for p in range(tail)]
        assert got == want, (r, local)


def test_no_ranges_stay_none():
    assert local_ranges(None, 3, 4, 5, 20, 2) is None
