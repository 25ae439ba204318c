"""session_for keeps one worker pool per placement: settings that change only how the workers attend (backend,
ring implementation, timeout), or a GPU pool that may need the GPUs an older one holds, replace the old pool
instead of holding its GPUs beside the new one; pools on other workers keep theirs; quality takes no part. Ray is
stood in for (no workers start)."""
from __future__ import annotations

import pytest

from genesis_core.parallel import ray_workers, session


class FakePool:
    started = []

    def __init__(self, world, **kwargs):
        self.world, self.kwargs, self.closed = world, kwargs, False
        FakePool.started.append(self)

    def close(self):
        self.closed = True


class FakeSession:
    def __init__(self, pool, cfg=1, ulysses=1, ring=1):
        self.pool = pool


@pytest.fixture
def fake_ray(monkeypatch):
    FakePool.started = []
    monkeypatch.setattr(ray_workers, "RayWorkerPool", FakePool)
    monkeypatch.setattr(ray_workers, "connect", lambda *a, **k: None)
    monkeypatch.setattr(session, "ParallelSession", FakeSession)
    monkeypatch.setattr(session, "_sessions", {})
    yield FakePool.started


def test_a_new_backend_on_the_same_workers_replaces_the_old_pool(fake_ray, genesis_log):
    a = session.session_for(session.ParallelSettings(cfg=2, use_gpu=False, backend="auto"))
    assert session.session_for(session.ParallelSettings(cfg=2, use_gpu=False, backend="auto", quality="fast")) is a
    b = session.session_for(session.ParallelSettings(cfg=2, use_gpu=False, backend="sdpa", ring_impl="allgather"))
    assert b is not a and a.pool.closed and not b.pool.closed and len(fake_ray) == 2
    assert any("backend auto -> sdpa" in m and "stopping the previous workers" in m for m in genesis_log)
    c = session.session_for(session.ParallelSettings(cfg=1, ulysses=2, use_gpu=False, backend="auto"))
    assert not b.pool.closed and not c.pool.closed  # CPU workers of another placement: both kept
    assert set(session._sessions.values()) == {b, c}
    session.close_sessions()
    assert b.pool.closed and c.pool.closed and not session._sessions


def test_the_log_names_what_changed(fake_ray, genesis_log):
    """A timeout-only change says so (not "backend auto -> auto")."""
    a = session.session_for(session.ParallelSettings(cfg=2, use_gpu=False))
    b = session.session_for(session.ParallelSettings(cfg=2, use_gpu=False, timeout_s=60.0))
    assert a.pool.closed and not b.pool.closed
    said = [m for m in genesis_log if "stopping the previous workers" in m]
    assert len(said) == 1 and "timeout_s 900.0 -> 60.0" in said[0], said
    assert "backend" not in said[0] and "ring" not in said[0], said
    session.close_sessions()


def test_a_gpu_session_that_may_need_the_same_gpus_stops_the_old_one(fake_ray, genesis_log):
    """cfg 2 on GPUs 0,1 then Ulysses 2 on GPUs 0,1: the old pool holds those GPUs, so it stops (on Ray the new
    placement would wait out its start timeout). Disjoint GPUs of this machine, and CPU workers, keep theirs."""
    a = session.session_for(session.ParallelSettings(cfg=2, gpu_ids=(0, 1)))
    b = session.session_for(session.ParallelSettings(cfg=1, ulysses=2, gpu_ids=(0, 1)))
    assert a.pool.closed and not b.pool.closed
    assert any("cfg 2 -> 1" in m and "ulysses 1 -> 2" in m for m in genesis_log), genesis_log
    c = session.session_for(session.ParallelSettings(cfg=2, gpu_ids=(2, 3)))
    d = session.session_for(session.ParallelSettings(cfg=2, use_gpu=False))
    assert not b.pool.closed and not c.pool.closed and not d.pool.closed
    e = session.session_for(session.ParallelSettings(cfg=1, ulysses=4, gpu_ids=()))  # every GPU of this machine
    assert b.pool.closed and c.pool.closed and not d.pool.closed and not e.pool.closed
    f = session.session_for(session.ParallelSettings(cfg=2, address="ray://10.0.0.2:10001"))
    g = session.session_for(session.ParallelSettings(cfg=1, ulysses=2, address="ray://10.0.0.2:10001"))
    assert f.pool.closed and not g.pool.closed and not e.pool.closed  # another cluster: e keeps its GPUs
    session.close_sessions()
