"""Workers placed by Ray on a two-"node" cluster that the test starts on 127.0.0.1 (``ray start --head`` plus a
second ``ray start --address``) and stops: everything of it (GCS, raylets, drivers, workers, their gloo group)
listens and talks on 127.0.0.1 only; ComfyUI's Wan model sequence- and CFG-parallel across the two nodes
equals one process; a killed worker fails the run with its rank named and the next pool works; and the Genesis
Multi-GPU node on a real ComfyUI sampler (KSampler, a weight patch on the model) equals sampling without it.
Skips without Ray (``pip install 'comfyui-genesis[ray]'``); the ComfyUI tests also without COMFYUI_PATH."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from comfy_helpers import REPO, comfyui_path, torchvision_stub_env
from genesis_core.parallel.launch import WorkerFailed, free_port

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'comfyui-genesis[ray]')")
COMFY = comfyui_path()
TESTS = str(Path(__file__).resolve().parent)

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_AUTH_MODE": "disabled"}
LOOPBACK = "127.0.0.1"
TEMP_ROOT = Path("/tmp" if os.name == "posix" else tempfile.gettempdir())  # short: Ray's socket paths < 108 chars
TEMP_PREFIX = "genesis-ray-"  # the cluster's --temp-dir: /tmp/genesis-ray-XXXXXXXX

# `ray start --address` refuses to add a node when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the switch that keeps Ray's
# node-IP lookup on 127.0.0.1; with the switch on, it turns 127.0.0.1 (in --address and --node-ip-address) into
# this machine's interface address by asking the route to 8.8.8.8. So the second node runs Ray's own CLI in a
# Python whose lookup gives Ray's single-machine answer; the processes it starts read the switch off (env).
_ADD_NODE = """
import sys
import ray._private.ray_constants as constants, ray._private.services as services, ray.util
from ray._common.network_utils import get_localhost_ip
def loopback(address=None):
    return get_localhost_ip()
constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = ray.util.get_node_ip_address = loopback
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def _ray_cli(*args, env, timeout=180, add_node=False):
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    cmd = [sys.executable, "-c", _ADD_NODE, *args] if add_node else [exe, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


def _cluster_processes(temp_dir):
    """The processes of the cluster kept in ``temp_dir``: those naming it on their command line (GCS, raylets,
    monitors, head) and all their descendants (agents, workers: their titles no longer name it)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(arg.endswith(temp_dir) or temp_dir + os.sep in arg for arg in proc.info["cmdline"] or ()):
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_cluster(temp_dir):
    """Kill this cluster's processes by pid (never another cluster's, unlike ``ray stop``); the ones left."""
    import psutil

    for _ in range(3):  # a raylet may start a worker while we look
        procs = _cluster_processes(temp_dir)
        if not procs:
            break
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=15)
    left = _cluster_processes(temp_dir)
    if not left:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return left


def _owner_alive(temp_dir):
    import psutil

    try:
        pid, started = (temp_dir / "owner").read_text().split()
        return psutil.Process(int(pid)).create_time() == float(started)
    except FileNotFoundError:  # no owner yet: a run starting right now, unless the folder is old
        try:
            return time.time() - temp_dir.stat().st_mtime < 60
        except OSError:
            return True  # gone already
    except (OSError, ValueError, psutil.Error):
        return False


def _stop_stale_clusters():
    """Clusters of earlier runs whose pytest died before its teardown (a live run's cluster is left alone)."""
    for d in TEMP_ROOT.glob(TEMP_PREFIX + "*"):
        if not _owner_alive(d):
            _stop_cluster(str(d))


@pytest.fixture(scope="module")
def cluster():
    """Head + one more node, both on 127.0.0.1 (GCS, raylets, object managers, workers), 2 CPUs each, in a fresh
    temp dir (a stale /tmp/ray cannot point anyone elsewhere); its processes are killed at the end, also when
    starting it failed."""
    import psutil

    from genesis_core.parallel.ray_workers import loopback_environment

    _stop_stale_clusters()
    temp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=str(TEMP_ROOT))
    me = psutil.Process()
    Path(temp, "owner").write_text(f"{me.pid} {me.create_time()}")
    port = free_port(LOOPBACK)
    env = dict(os.environ, **{**RAY_ENV, **loopback_environment()}, PYTHONPATH=os.pathsep.join([str(REPO), TESTS]))
    env.pop("RAY_ADDRESS", None)
    common = [f"--node-ip-address={LOOPBACK}", f"--temp-dir={temp}", "--num-cpus=2", "--num-gpus=0",
              "--disable-usage-stats"]
    try:
        _ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", *common,
                 "--resources={\"head_node\": 1}", env=env)
        _ray_cli("start", f"--address={LOOPBACK}:{port}", *common, "--resources={\"second_node\": 1}", env=env,
                 add_node=True)
        yield {"address": f"{LOOPBACK}:{port}", "env": env, "temp_dir": temp}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        left = _stop_cluster(temp)
        assert not left, f"Ray processes of the test cluster outlived their kill: {left}"


def _refuse_route_lookup(address=None):
    raise AssertionError(f"Ray asked the route to {address or '8.8.8.8'} for this node's IP")


@pytest.fixture(scope="module")
def driver(cluster):
    from genesis_core.parallel.ray_workers import connect

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = cluster["env"]["PYTHONPATH"]  # the actors import the test's helper functions
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        with pytest.MonkeyPatch.context() as mp:  # the driver never asks the route to 8.8.8.8 for its IP
            mp.setattr(ray._private.services, "node_ip_address_from_perspective", _refuse_route_lookup)
            info = connect(cluster["address"])
        assert info["resources"].get("CPU") == 4.0
        yield dict(cluster, info=info)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _is_loopback(ip):
    return ip in (LOOPBACK, "::1", "::ffff:" + LOOPBACK)


def test_cluster_and_driver_are_on_loopback(driver):
    """Both nodes, the GCS address (also in the cluster's address file) and this driver are on 127.0.0.1."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK}, nodes
    assert driver["info"]["address"] == driver["address"] == ray.get_runtime_context().gcs_address
    assert driver["address"].rsplit(":", 1)[0] == LOOPBACK and driver["info"]["node_ip"] == LOOPBACK
    assert ray._private.utils.read_ray_address(driver["temp_dir"]) == driver["address"]
    _assert_sockets_on_loopback(driver["temp_dir"])


def _assert_sockets_on_loopback(temp_dir):
    """Every socket of the cluster's processes listens on loopback; every connected one has a loopback peer."""
    import psutil

    procs, bad = _cluster_processes(temp_dir), []
    assert len(procs) >= 5, procs  # GCS, 2 raylets, their agents
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM) and not _is_loopback(c.laddr.ip):
                bad.append((proc.pid, proc.name(), "listens on", c.laddr))
            elif c.raddr and not _is_loopback(c.raddr.ip):
                bad.append((proc.pid, proc.name(), "talks to", c.raddr))
    assert not bad, bad


def _die_on_rank_one(ctx):
    if ctx.rank == 1:
        os._exit(7)
    import torch.distributed as dist

    dist.barrier()
    return ctx.rank


def toy_attention_runner(ctx, mesh, payload, options):
    """A model without ComfyUI: attention of x to itself over the sequence mesh (tokens cut, attended, gathered)."""
    from genesis_core.parallel import gather_tokens, sequence_attention, split_tokens

    def run(inputs):
        x = inputs["x"]  # [B, H, N, D]
        local, _, real = split_tokens(x, mesh.shard_index, mesh.sequence_degree, dim=2)
        out = sequence_attention(local, local * payload["k_scale"], local, mesh, real=real)
        return gather_tokens(out, real, group=mesh.sequence_group, dim=2)

    return run


def test_sequence_and_cfg_across_two_ray_nodes_then_a_killed_worker(driver):
    """No ComfyUI needed: Ray places one worker on each node, they join one gloo group, sequence-parallel
    attention and the CFG split equal float64 one-process attention; a worker that dies is named."""
    from conftest import reference_attention
    from genesis_core.parallel.ray_workers import RayWorkerPool
    from genesis_core.parallel.session import ParallelSession

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 13, 8, generator=gen)  # 13 tokens on 2 ranks: 7 + 6 (one pad)
    want = reference_attention(x, x * 0.5, x).float()
    for attempt in range(2):  # the second pool after the first one's worker died: a fresh start works
        pool = RayWorkerPool(2, use_gpu=False, address=driver["address"], strategy="STRICT_SPREAD", timeout_s=120)
        try:
            assert len({p["node_id"] for p in pool.placement}) == 2  # one worker on each node
            assert [p["ip"] for p in pool.placement] == [LOOPBACK, LOOPBACK]
            seq = ParallelSession(pool, cfg=1, ulysses=2)
            seq.load(toy_attention_runner, {"k_scale": 0.5})
            torch.testing.assert_close(seq.call(x, torch.zeros(2), {}, [0, 1]), want, atol=2e-5, rtol=2e-5)
            _assert_sockets_on_loopback(driver["temp_dir"])  # with the workers' gloo group up
            cfg = ParallelSession(pool, cfg=2, ulysses=1)
            cfg.load(toy_attention_runner, {"k_scale": 0.5})
            torch.testing.assert_close(cfg.call(x, torch.zeros(2), {}, [1, 0]), want, atol=2e-5, rtol=2e-5)
            if attempt == 0:
                with pytest.raises(WorkerFailed, match=r"Ray worker rank 1 \(host .*\) died .*next run starts fresh"):
                    pool.run(_die_on_rank_one)
                assert pool.closed
                with pytest.raises(RuntimeError, match="closed"):
                    cfg.call(x, torch.zeros(2), {}, [0, 1])
        finally:
            pool.close()


@pytest.mark.comfyui
@pytest.mark.skipif(COMFY is None, reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_wan_across_two_ray_nodes_and_a_killed_worker(driver):
    from genesis_core.interop.comfy_parallel import build_diffusion_runner
    from genesis_core.parallel.ray_workers import RayWorkerPool
    from genesis_core.parallel.session import ParallelSession
    from test_parallel_comfy_models import WAN, assert_close, one_process, random_state, wan_inputs

    pool = RayWorkerPool(2, use_gpu=False, address=driver["address"], strategy="STRICT_SPREAD", timeout_s=120)
    try:
        assert len({p["node_id"] for p in pool.placement}) == 2  # one worker on each node
        state = pool.run(random_state, WAN, 5, str(COMFY))[0]
        payload = dict(WAN, state_dict=state, comfy_path=str(COMFY))
        gen = torch.Generator().manual_seed(21)
        inputs = wan_inputs(gen, 2, 2, 6, 8)
        want = pool.run(one_process, payload, inputs)[0]
        seq = ParallelSession(pool, cfg=1, ulysses=2, ring=1)
        seq.load(build_diffusion_runner, payload, {})
        assert_close(seq.call(inputs["x"], inputs["timestep"], inputs["conds"], [0, 1]), want)
        ring = ParallelSession(pool, cfg=1, ulysses=1, ring=2)
        ring.load(build_diffusion_runner, payload, {})
        assert_close(ring.call(inputs["x"], inputs["timestep"], inputs["conds"], [0, 1]), want)
        cfg = ParallelSession(pool, cfg=2, ulysses=1, ring=1)
        cfg.load(build_diffusion_runner, payload, {})
        assert_close(cfg.call(inputs["x"], inputs["timestep"], inputs["conds"], [0, 1]), want)

        with pytest.raises(WorkerFailed, match=r"Ray worker rank 1 \(host .*\) died .*the next run starts fresh"):
            pool.run(_die_on_rank_one)
        assert pool.closed
        with pytest.raises(RuntimeError, match="closed"):
            cfg.call(inputs["x"], inputs["timestep"], inputs["conds"], [0, 1])
    finally:
        pool.close()
    fresh = RayWorkerPool(2, use_gpu=False, address=driver["address"], timeout_s=120)
    try:
        again = ParallelSession(fresh, cfg=2, ulysses=1, ring=1)
        again.load(build_diffusion_runner, payload, {})
        assert_close(again.call(inputs["x"], inputs["timestep"], inputs["conds"], [0, 1]), want)
    finally:
        fresh.close()


# ---------------------------------------------------------------- the node on ComfyUI's own sampler


@pytest.mark.comfyui
@pytest.mark.skipif(COMFY is None, reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_multigpu_node_on_comfyui_sampler_equals_one_process(driver, tmp_path):
    """In a fresh interpreter (ComfyUI's top-level modules must not leak here): a tiny Wan 2.1 built from
    ComfyUI's supported-model config, a weight patch on it, KSampler with CFG 4, with and without the node."""
    env = dict(os.environ, **RAY_ENV, COMFYUI_PATH=str(COMFY), GENESIS_RAY_ADDRESS=driver["address"],
               PYTHONPATH=os.pathsep.join([str(REPO), TESTS]))
    env = torchvision_stub_env(env, tmp_path / "stub")
    code = f"import sys; sys.path.insert(0, {TESTS!r}); import test_parallel_ray as t; t._sampler_main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=540, env=env,
                         cwd=str(COMFY))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("GENESIS_RESULT ")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    result = json.loads(lines[-1][len("GENESIS_RESULT "):])
    assert result["patch_matters"] > 1e-3  # the weight patch changes the result, so it must have travelled
    for mode in ("cfg", "sequence"):
        r = result[mode]
        assert r["is_clone"] and r["calls"] > 0, r
        assert r["err"] <= 2e-4 * max(1.0, r["scale"]), (mode, r)
    assert "cannot split this model" in result["refused"]
    assert "odd" in result["odd"]
    # an Attention Switch after the node (quality high, first and last step exact) sets each call's level
    levels, r = result["switch"]["levels"], result["switch"]
    assert levels[0] == levels[-1] == "exact" and "high" in levels and r["err"] <= 2e-4 * max(1.0, r["scale"]), r


def _sampler_main():
    sys.path.insert(0, str(COMFY))
    os.chdir(str(COMFY))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from comfy_helpers import load_pack

    pack = load_pack()
    node = pack.NODE_CLASS_MAPPINGS["GenesisMultiGPU"]()
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 16,
           "dim": 32, "ffn_dim": 48, "freq_dim": 16, "text_dim": 24, "out_dim": 16, "num_heads": 4, "num_layers": 2,
           "eps": 1e-6, "qk_norm": True, "cross_attn_norm": True}
    config = comfy.supported_models.WAN21_T2V(cfg)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    plain = model.clone()
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    model.add_patches({key: (torch.randn(base.state_dict()[key].shape, generator=gen) * 0.5,)}, 1.0)

    latent = torch.zeros(1, 16, 2, 8, 8)
    noise = torch.randn(latent.shape, generator=gen)
    pos = [[torch.randn(1, 16, 24, generator=gen), {}]]
    neg = [[torch.randn(1, 16, 24, generator=gen), {}]]

    def sample(m):
        return comfy.sample.sample(m, noise, 3, 4.0, "euler", "simple", pos, neg, latent, disable_pbar=True, seed=1)

    want = sample(model)
    result = {"patch_matters": (sample(plain) - want).abs().max().item()}
    address = os.environ["GENESIS_RAY_ADDRESS"]
    ray._private.services.node_ip_address_from_perspective = _refuse_route_lookup  # this driver stays on loopback
    for mode in ("cfg", "sequence"):
        (clone,) = node.execute(model, mode=mode, gpus="2", ring=1, ray_address=address, workers="cpu")
        got = sample(clone)
        wrapper = clone.model_options["model_function_wrapper"]
        result[mode] = {"is_clone": clone is not model and "model_function_wrapper" not in model.model_options,
                        "calls": wrapper.calls, "err": (got - want).abs().max().item(),
                        "scale": want.abs().max().item()}
    seen = len(wrapper.levels)
    (switched,) = pack.NODE_CLASS_MAPPINGS["GenesisAttentionSwitch"]().execute(clone, quality="high", exact_steps=1)
    got = sample(switched)
    result["switch"] = {"levels": wrapper.levels[seen:], "err": (got - want).abs().max().item(),
                        "scale": want.abs().max().item()}
    try:
        node.execute(model, mode="sequence", gpus="8", ring=1, ray_address=address, workers="cpu")
    except ValueError as exc:
        result["refused"] = str(exc)  # 4 heads on 8 Ulysses ranks
    try:
        node.execute(model, mode="both", gpus="3", ring=1, ray_address=address, workers="cpu")
    except ValueError as exc:
        result["odd"] = str(exc)
    sys.modules[pack.__name__ + ".genesis_core.parallel.session"].close_sessions()  # the node's (the pack's) pools
    print("GENESIS_RESULT " + json.dumps(result), flush=True)


def _where_and_double(x, fail_on=None):
    import ray as _r

    if fail_on is not None and int(x.flatten()[0]) == fail_on:
        raise ValueError(f"refusing split starting with {fail_on}")
    return _r.get_runtime_context().get_node_id(), x * 2


def test_ray_parallel_execute_spreads_splits_over_both_nodes_in_order(driver):
    from genesis_core.parallel.ray_placement import RayPlacementError, ray_parallel_execute

    splits = [torch.full((3,), float(i)) for i in range(4)]
    out = ray_parallel_execute(_where_and_double, splits, address=driver["address"], use_gpu=False)
    assert [o[1].tolist() for o in out] == [[2.0 * i] * 3 for i in range(4)]  # results in split order
    assert len({o[0] for o in out}) == 2  # SPREAD: both nodes served splits
    with pytest.raises(RayPlacementError, match=r"(?s)1 of 4 split\(s\) failed.*split 2 on host .*refusing split "
                                                r"starting with 2") as info:
        ray_parallel_execute(_where_and_double, [(s, 2) for s in splits], address=driver["address"], use_gpu=False)
    assert [f[0] for f in info.value.failures] == [2]
