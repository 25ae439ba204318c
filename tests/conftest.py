"""Shared fixtures: float64 reference attention, a capture of the [Genesis] log, CUDA skip marker."""
from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Without CUDA, Genesis's Triton kernels (the FP8 quantiser) run in Triton's CPU interpreter. Triton reads the switch
# when a kernel is decorated, at the first import, and any test module may import them first: set it here, once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from genesis_core import _log  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_attention(q, k, v, mask=None, scale=None):
    """float64 math attention in BHND; GQA by repeating k/v heads; mask bool (True=attend) or additive."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        m = mask.cpu()
        while m.dim() < 4:
            m = m.unsqueeze(0) if m.dim() != 3 else m.unsqueeze(1)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    return torch.softmax(s, dim=-1) @ v


def l2_and_cosine(out, ref):
    """(relative L2 error, cosine similarity) of ``out`` against ``ref`` in float64: a quality level's metric."""
    o, r = out.double().cpu().flatten(), ref.double().cpu().flatten()
    return float((o - r).norm() / r.norm()), float(torch.dot(o, r) / (o.norm() * r.norm()))


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def genesis_log():
    """Messages the ``genesis`` logger emits during the test (log_once memory reset first)."""
    _log.reset_once()
    handler = _Capture()
    _log.logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        _log.logger.removeHandler(handler)
