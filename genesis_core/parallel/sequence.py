"""Sequence-parallel attention over torch.distributed: Ulysses, ring, and the two combined.

Each rank holds one shard of the token sequence: q, k, v ``[B, H, Jf + L + Jb, D]`` (layout ``BHND``), where the
``L`` middle tokens are this rank's shard (the first ``real[shard]`` of them real, the rest padding) and the
optional ``Jf`` front / ``Jb`` back tokens are *joint* tokens that every rank holds in full (the text tokens of
an MMDiT: Flux and SD3 put them in front, HunyuanVideo behind). The result is exactly what one process computing
attention over the whole sequence (joint tokens + every shard's real tokens, padding excluded) would give for
this rank's tokens, in this rank's layout.

* **Ulysses** (``mesh.ulysses`` ranks): an all-to-all turns the token split into a head split (each rank then
  holds every token of ``H / ulysses`` heads), attention runs locally through Genesis's own
  :func:`genesis_core.attn.dispatch.attention` (so AUTO, the ``quality`` budget and every backend apply), and an
  all-to-all turns it back. The heads must divide among the Ulysses ranks.
* **Ring** (``mesh.ring`` ranks): key/value blocks travel round the ring while each rank attends its queries to
  the block it holds; partial results are merged by their log-sum-exp. Needed when the heads do not divide, and
  it keeps only two key/value blocks per rank. Genesis's dispatch returns no log-sum-exp, so ring blocks run on
  PyTorch's fused SDPA kernels that do (``_scaled_dot_product_flash_attention*``/efficient), falling back to a
  chunked float32 softmax: they are exact whatever ``quality`` says (a lossy level is logged once and applies
  to nothing there). ``ring_impl="allgather"`` instead gathers the key/value blocks and makes one Genesis
  dispatch call (every Genesis backend and the ``quality`` budget apply; the whole key/value of ``H / ulysses``
  heads is held).
* **Both**: Ulysses inside each ring rank's group, the ring across groups (``world = ulysses * ring``).

Joint tokens: their queries attend to every token; their result is made identical on every rank (broadcast
along the ring, all-gather across the Ulysses heads). Inference only (the collectives here have no backward).

Key masks (HunyuanVideo's text mask): a mask that is the same for every query, given over the whole sequence as
one process sees it (joint front, every shard's real tokens in shard order, joint back), is exact: each rank
holds it whole and applies the slice that belongs to the keys it attends to. A mask that differs per query
would have to be cut with the queries and is refused.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._log import first_line, log_once
from ..attn import quality as _quality
from ..attn.dispatch import attention as genesis_attention
from ..attn.types import mask_4d_shape
from .mesh import ParallelMesh
from .shard import check_real

__all__ = ["sequence_attention", "group_mesh", "attention_with_lse", "RING_IMPLS"]

RING_IMPLS = ("ring", "allgather")


def group_mesh(group=None) -> ParallelMesh:
    """A Ulysses-only mesh over an existing process group (``None``: the default group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("group_mesh needs an initialised torch.distributed process group")
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    me = dist.get_rank()
    if me not in ranks:
        raise ValueError(f"this process (rank {me}) is not a member of the group {ranks}")
    size = len(ranks)
    return ParallelMesh(cfg=1, ulysses=size, ring=1, rank=me, cfg_index=0, ring_index=0,
                        ulysses_index=ranks.index(me), sequence_group=group if size > 1 else None,
                        ulysses_group=(group if group is not None else dist.group.WORLD) if size > 1 else None,
                        ring_group=None, cfg_group=None, ulysses_ranks=ranks, ring_ranks=(me,),
                        sequence_ranks=ranks, cfg_ranks=(me,))


# ---------------------------------------------------------------- a block with its log-sum-exp


def _math_lse(q, k, v, scale: float, bias=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked float32 (float64 stays float64) softmax attention returning (out, lse); ``bias`` is additive,
    broadcastable to ``[B, H, 1, Nk]``."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    step = max(1, min(nq, (1 << 25) // max(1, b * h * nk)))
    kt = k.to(work).transpose(-1, -2)
    vv = v.to(work)
    bb = None if bias is None else bias.to(work)
    outs, lses = [], []
    for s in range(0, nq, step):
        scores = (q[:, :, s:s + step].to(work) @ kt) * scale
        if bb is not None:
            scores = scores + bb
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse.unsqueeze(-1)) @ vv)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias=None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of BHND ``q`` to ``k``/``v`` (same heads) -> ``(out [B,H,Nq,Dv], lse [B,H,Nq] float)``.

    ``bias``: None or a finite additive key bias broadcastable to ``[B, H, 1, Nk]`` (on CUDA it runs on the
    chunked float32 path; the ring gives it only the joint tokens' block and shard blocks whose mask is set)."""
    dev = q.device.type
    try:
        if dev == "cpu" and q.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
            return out, lse
        if bias is not None:
            return _math_lse(q, k, v, scale, bias)
        if dev == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 \
                and q.shape[-1] == v.shape[-1]:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse
        if dev == "cuda" and q.dtype == torch.float32:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, False, scale=scale)[:2]
            return out, lse[..., : q.shape[2]]
    except Exception as exc:  # an unsupported shape/dtype/GPU: the plain path below serves it
        log_once(("ring-lse-fallback", dev, str(q.dtype), first_line(exc, 200)),
                 f"ring attention block on {dev} {q.dtype} runs on the chunked float32 path: {first_line(exc, 200)}")
    return _math_lse(q, k, v, scale, bias)


# ---------------------------------------------------------------- collectives


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _tokens_to_heads(x: torch.Tensor, u: int, group) -> torch.Tensor:
    """``[S, B, H, L, D]`` token shards -> ``[S, B, H/u, u*L, D]``: every shard's tokens, this rank's heads."""
    if u == 1:
        return x
    s, b, h, n, d = x.shape
    y = x.reshape(s, b, u, h // u, n, d).permute(2, 0, 1, 3, 4, 5)
    y = _all_to_all(y, group)  # [u (source shard), S, B, H/u, L, D]
    return y.permute(1, 2, 3, 0, 4, 5).reshape(s, b, h // u, u * n, d)


def _heads_to_tokens(y: torch.Tensor, u: int, group) -> torch.Tensor:
    """``[B, H/u, u*L, D]`` -> ``[B, H, L, D]`` (the inverse of :func:`_tokens_to_heads`)."""
    if u == 1:
        return y
    b, hh, n, d = y.shape
    x = y.reshape(b, hh, u, n // u, d).permute(2, 0, 1, 3, 4)
    x = _all_to_all(x, group)  # [u (source head group), B, H/u, L, D]
    return x.permute(1, 0, 2, 3, 4).reshape(b, hh * u, n // u, d)


def _compact(t: torch.Tensor, counts: Sequence[int], length: int) -> torch.Tensor:
    """Drop the padding of ``len(counts)`` shards of ``length`` tokens laid end to end along dim 2."""
    if all(c == length for c in counts):
        return t
    pieces = [t.narrow(2, i * length, c) for i, c in enumerate(counts) if c]
    return torch.cat(pieces, dim=2) if pieces else t.narrow(2, 0, 0)


def _ring_attention(qq, kb, vb, jk, jv, mesh: ParallelMesh, real: List[int], length: int, scale: float,
                    bias: Optional[torch.Tensor] = None, jf: int = 0):
    """LSE-merged attention of ``qq`` to every ring rank's key/value block (joint k/v added to the first).

    ``bias``: a finite additive key bias ``[B|1, H|1, 1, keys]`` over the whole sequence (``jf`` joint front
    keys, every shard's real keys in order, the joint back keys); the joint keys then form a block of their own,
    and a shard block gets its slice of the bias only where that slice is not all zero."""
    import torch.distributed as dist

    u, r, me = mesh.ulysses, mesh.ring, mesh.ring_index
    group, ranks = mesh.ring_group, mesh.ring_ranks
    nxt, prv = ranks[(me + 1) % r], ranks[(me - 1) % r]
    cur = torch.stack((kb, vb)).contiguous()
    acc_out: Optional[torch.Tensor] = None
    acc_lse: Optional[torch.Tensor] = None

    def merge(k_, v_, b_):
        nonlocal acc_out, acc_lse
        if not k_.shape[2]:
            return
        o, lse = attention_with_lse(qq, k_, v_, scale, b_)
        work = torch.float64 if o.dtype == torch.float64 else torch.float32
        o, lse = o.to(work), lse.to(work)
        if acc_out is None:
            acc_out, acc_lse = o, lse
        else:
            new = torch.logaddexp(acc_lse, lse)
            acc_out = acc_out * torch.exp(acc_lse - new).unsqueeze(-1) + o * torch.exp(lse - new).unsqueeze(-1)
            acc_lse = new

    total = sum(real)
    if bias is not None and jk is not None:
        merge(jk, jv, torch.cat((bias.narrow(3, 0, jf), bias.narrow(3, jf + total, bias.shape[3] - jf - total)), 3))
        jk = jv = None
    for step in range(r):
        src = (me - step) % r
        reqs, incoming = [], None
        if step < r - 1:
            incoming = torch.empty_like(cur)
            ops = [dist.P2POp(dist.isend, cur, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
            reqs = dist.batch_isend_irecv(ops)
        counts = real[src * u:(src + 1) * u]
        k_, v_ = _compact(cur[0], counts, length), _compact(cur[1], counts, length)
        b_ = None
        if bias is not None:
            b_ = bias.narrow(3, jf + sum(real[:src * u]), sum(counts))
            b_ = b_ if bool(b_.any()) else None
        if step == 0 and jk is not None:
            k_, v_ = torch.cat((jk, k_), dim=2), torch.cat((jv, v_), dim=2)
        merge(k_, v_, b_)
        for req in reqs:
            req.wait()
        if incoming is not None:
            cur = incoming
    return acc_out.to(qq.dtype)


def _allgather_kv(kb, vb, mesh: ParallelMesh, real: List[int], length: int):
    import torch.distributed as dist

    u = mesh.ulysses
    kv = torch.stack((kb, vb)).contiguous()
    blocks = [torch.empty_like(kv) for _ in range(mesh.ring)]
    dist.all_gather(blocks, kv, group=mesh.ring_group)
    ks, vs = [], []
    for j, blk in enumerate(blocks):
        counts = real[j * u:(j + 1) * u]
        ks.append(_compact(blk[0], counts, length))
        vs.append(_compact(blk[1], counts, length))
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


# ---------------------------------------------------------------- the call


def _check(q, k, v, mesh, joint_front, joint_back, layout) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor in layout {layout!r}; got {got}")
    if not isinstance(mesh, ParallelMesh):
        raise TypeError(f"mesh must be a ParallelMesh (build_mesh or group_mesh); got {type(mesh).__name__}")
    for name, j in (("joint_front", joint_front), ("joint_back", joint_back)):
        if isinstance(j, bool) or not isinstance(j, int) or j < 0:
            raise ValueError(f"{name} must be a non-negative int; got {j!r}")


def sequence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: ParallelMesh,
    *,
    real: Optional[Sequence[int]] = None,
    joint_front: int = 0,
    joint_back: int = 0,
    layout: str = "BHND",
    backend="auto",
    scale: Optional[float] = None,
    ring_impl: str = "ring",
    mask: Optional[torch.Tensor] = None,
    quality: Optional[str] = None,
) -> torch.Tensor:
    """Attention over a token sequence sharded across ``mesh.ulysses * mesh.ring`` ranks (see the module docstring).

    Args:
        q, k, v: this rank's tokens, ``[B, H, Jf + L + Jb, D]`` (``"BHND"``) or ``[B, Jf + L + Jb, H, D]``
            (``"BNHD"``); k/v may have fewer heads (grouped-query attention). Every rank passes the same ``L``.
        mesh: from :func:`~genesis_core.parallel.mesh.build_mesh` or :func:`group_mesh`; the sequence group is
            its ``ulysses * ring`` ranks, shard index ``ring_index * ulysses + ulysses_index``.
        real: real tokens in each shard (one count per shard, padding at each shard's end); default all ``L``.
        joint_front, joint_back: joint tokens in front of / behind the shard, identical on every rank.
        backend, scale: as for :func:`genesis_core.attention` (``backend`` serves the Ulysses and the
            ``allgather`` local calls).
        ring_impl: ``"ring"`` (pass key/value blocks round the ring) or ``"allgather"``.
        quality: the budget of every Genesis attention call made here (``"exact"``, ``"high"``, ``"fast"``; None:
            as :func:`genesis_core.attention` takes None). Ring blocks (``ring > 1`` with ``ring_impl="ring"``)
            run on PyTorch's SDPA for their log-sum-exp and stay exact.
        mask: None, or a key mask that is the same for every query, over the whole sequence as one process sees
            it (``Jf`` joint front keys, every shard's real keys in shard order, ``Jb`` joint back keys):
            boolean (True = attend) or additive float, shaped ``[keys]``, ``[B|1, 1, keys]`` or
            ``[B|1, H|1, 1, keys]``. Every rank passes the same mask.

    Returns: this rank's result in its own layout and shape (padding rows hold finite values to be dropped).
    Raises: ValueError naming the argument when heads do not divide among the Ulysses ranks, shapes disagree, etc.
    """
    _check(q, k, v, mesh, joint_front, joint_back, layout)
    if layout not in ("BHND", "BNHD"):
        raise ValueError(f"layout must be 'BHND' or 'BNHD'; got {layout!r}")
    if ring_impl not in RING_IMPLS:
        raise ValueError(f"ring_impl must be one of {RING_IMPLS}; got {ring_impl!r}")
    if quality is not None:
        quality = _quality.normalise(quality)
    if layout == "BNHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, h, n, d = q.shape
    hk = k.shape[1]
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"query, key and value must hold the same tokens on every rank (self-attention); got "
                         f"{n}, {k.shape[2]}, {v.shape[2]} tokens")
    if k.shape[1] != v.shape[1] or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk}, {v.shape[1]})")
    length = n - joint_front - joint_back
    if length < 1:
        raise ValueError(f"joint_front + joint_back ({joint_front} + {joint_back}) leaves no shard tokens of {n}")
    u, rr = mesh.ulysses, mesh.ring
    if h % u:
        raise ValueError(f"the {h} attention heads do not divide among {u} Ulysses ranks; use a Ulysses degree that "
                         f"divides {h} and put the other ranks on the ring")
    real = check_real(real, u * rr, length)
    if mask is not None:
        mask = _key_mask(mask, b, h, joint_front + sum(real) + joint_back)
    if scale is None:
        scale = d ** -0.5
    if hk % u:  # grouped-query k/v heads that do not divide: give every query head its own copy
        k, v, hk = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1), h
    ui = mesh.ulysses_index
    jf, jb = joint_front, joint_back

    def parts(t):
        return t.narrow(2, 0, jf), t.narrow(2, jf, length), t.narrow(2, jf + length, jb)

    (qf, qs, qb), (kf, ks, kb_), (vf, vs, vb_) = parts(q), parts(k), parts(v)
    if hk == h and v.shape[-1] == d:
        qh, kh, vh = _tokens_to_heads(torch.stack((qs, ks, vs)), u, mesh.ulysses_group).unbind(0)
    else:
        qh = _tokens_to_heads(qs.unsqueeze(0), u, mesh.ulysses_group)[0]
        kh, vh = _tokens_to_heads(torch.stack((ks, vs)), u, mesh.ulysses_group).unbind(0) if k.shape[-1] == v.shape[-1] \
            else (_tokens_to_heads(ks.unsqueeze(0), u, mesh.ulysses_group)[0],
                  _tokens_to_heads(vs.unsqueeze(0), u, mesh.ulysses_group)[0])
    hq_local, hk_local = h // u, hk // u

    def heads(t, per):
        return t.narrow(1, ui * per, per)

    jq = torch.cat((heads(qf, hq_local), qh, heads(qb, hq_local)), dim=2) if (jf or jb) else qh
    if mask is not None and mask.shape[1] == h:
        mask = heads(mask, hq_local)
    jkf, jvf = heads(kf, hk_local), heads(vf, hk_local)
    jkb, jvb = heads(kb_, hk_local), heads(vb_, hk_local)

    my_counts = real[mesh.ring_index * u:(mesh.ring_index + 1) * u]
    if rr == 1:
        keys = torch.cat((jkf, _compact(kh, my_counts, length), jkb), dim=2)
        vals = torch.cat((jvf, _compact(vh, my_counts, length), jvb), dim=2)
        out = genesis_attention(jq, keys, vals, _as_dtype(mask, jq.dtype), backend=backend, scale=scale,
                                quality=quality)
    elif ring_impl == "allgather":
        kall, vall = _allgather_kv(kh, vh, mesh, real, length)
        keys, vals = torch.cat((jkf, kall, jkb), dim=2), torch.cat((jvf, vall, jvb), dim=2)
        out = genesis_attention(jq, keys, vals, _as_dtype(mask, jq.dtype), backend=backend, scale=scale,
                                quality=quality)
    else:
        if quality not in (None, "exact"):
            log_once(("ring-exact", quality), f"ring attention blocks run on PyTorch's SDPA (they need its "
                     f"log-sum-exp), at exact precision: quality '{quality}' applies to none of them")
        if hk_local != hq_local:
            kh, vh = kh.repeat_interleave(hq_local // hk_local, 1), vh.repeat_interleave(hq_local // hk_local, 1)
            jkf, jvf = jkf.repeat_interleave(hq_local // hk_local, 1), jvf.repeat_interleave(hq_local // hk_local, 1)
            jkb, jvb = jkb.repeat_interleave(hq_local // hk_local, 1), jvb.repeat_interleave(hq_local // hk_local, 1)
        jk = torch.cat((jkf, jkb), dim=2) if (jf or jb) else None
        jv = torch.cat((jvf, jvb), dim=2) if (jf or jb) else None
        bias = None if mask is None else mask.clamp(min=torch.finfo(mask.dtype).min)  # -inf: no NaN in the merge
        out = _ring_attention(jq, kh, vh, jk, jv, mesh, real, length, scale, bias, jf)

    shard_out = _heads_to_tokens(out.narrow(2, jf, u * length), u, mesh.ulysses_group)
    if jf or jb:
        joint = torch.cat((out.narrow(2, 0, jf), out.narrow(2, jf + u * length, jb)), dim=2).contiguous()
        joint = _replicate_joint(joint, mesh)
        result = torch.cat((joint.narrow(2, 0, jf), shard_out, joint.narrow(2, jf, jb)), dim=2)
    else:
        result = shard_out
    return result.transpose(1, 2) if layout == "BNHD" else result


def _key_mask(mask, b: int, h: int, keys: int) -> torch.Tensor:
    """A key mask over the whole sequence -> 4-D ``[B|1, H|1, 1, keys]``, additive float (True = attend -> 0)."""
    shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
    if not isinstance(mask, torch.Tensor) or not 1 <= mask.dim() <= 4:
        raise ValueError(f"mask must be a 1- to 4-D tensor; got {shape}")
    m = mask.reshape(mask_4d_shape(mask.shape))
    if m.shape[2] != 1 or m.shape[3] != keys or m.shape[0] not in (1, b) or m.shape[1] not in (1, h):
        raise ValueError(f"mask must be a key mask over the whole sequence ({keys} keys: the joint tokens and every "
                         f"shard's real tokens), the same for every query: [{keys}], [B|1, 1, {keys}] or "
                         f"[B|1, H|1, 1, {keys}]; got {shape} (a mask that differs per query cannot be split)")
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf"))
    return m if m.is_floating_point() else m.to(torch.float32)


def _as_dtype(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if mask is None else mask.to(dtype)


def _replicate_joint(joint: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """Joint-token results of this rank's heads -> all heads, identical on every rank of the sequence group."""
    import torch.distributed as dist

    if mesh.ring > 1:  # ring ranks merged the blocks in different orders: take ring index 0's rounding
        dist.broadcast(joint, src=mesh.ring_ranks[0], group=mesh.ring_group)
    if mesh.ulysses == 1:
        return joint
    pieces: List[torch.Tensor] = [torch.empty_like(joint) for _ in range(mesh.ulysses)]
    dist.all_gather(pieces, joint, group=mesh.ulysses_group)
    return torch.cat(pieces, dim=1)
