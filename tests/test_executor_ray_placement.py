"""HeterogeneousExecutor.parallel_execute(placement="ray") hands the splits to the Ray placement with checked
arguments (the Ray cluster itself is exercised in tests/test_parallel_ray.py)."""
from __future__ import annotations

import pytest
import torch

from genesis_core import HeterogeneousExecutor
from genesis_core.parallel import ray_placement


def test_ray_placement_is_reached_with_the_splits_in_order(monkeypatch):
    seen = {}

    def fake(fn, splits, *, address=None, use_gpu=True, return_device=None, **kw):
        seen.update(splits=splits, address=address, use_gpu=use_gpu, return_device=return_device)
        return [fn(s) for s in splits]

    monkeypatch.setattr(ray_placement, "ray_parallel_execute", fake)
    xs = [torch.randn(3, 4) for _ in range(3)]
    out = HeterogeneousExecutor().parallel_execute(lambda t: t * 2, xs, ["cpu"] * 3, placement="ray",
                                                   address="127.0.0.1:6379")
    assert all(torch.equal(o, x * 2) for o, x in zip(out, xs))
    assert seen["use_gpu"] is False and seen["address"] == "127.0.0.1:6379" and len(seen["splits"]) == 3
    HeterogeneousExecutor().parallel_execute(lambda t: t, xs, placement="ray")
    assert seen["use_gpu"] is True  # no backends: one GPU per split


@pytest.mark.parametrize("kwargs, match", [
    ({"placement": "cloud"}, r"placement must be 'local' or 'ray'; got 'cloud'"),
    ({"placement": "ray", "backends": ["cpu", "cuda"]}, r"all 'cuda' or all 'cpu'"),
    ({"placement": "ray", "backends": ["cpu"]}, r"same length"),
])
def test_bad_ray_placement_arguments_say_what_to_change(kwargs, match, monkeypatch):
    monkeypatch.setattr(ray_placement, "ray_parallel_execute", lambda *a, **k: pytest.fail("must not run"))
    xs = [torch.randn(2), torch.randn(2)]
    backends = kwargs.pop("backends", ["cpu", "cpu"])
    with pytest.raises(ValueError, match=match):
        HeterogeneousExecutor().parallel_execute(lambda t: t, xs, backends, **kwargs)


def test_local_placement_still_needs_backends():
    with pytest.raises(TypeError, match="backends must be a list or tuple"):
        HeterogeneousExecutor().parallel_execute(lambda t: t, [torch.randn(2)])
