"""A real ComfyUI server (COMFYUI_PATH) on 127.0.0.1 with the pack: /object_info, /genesis/backends, the API
workflows, and bad input coming back as node errors while the server keeps running."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from comfy_helpers import REPO, ComfyServer, comfyui_path, http_get, load_client

pytestmark = pytest.mark.skipif(comfyui_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout")

WORKFLOWS = REPO / "example_workflows"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(tmp_path_factory.mktemp("comfy_base")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client():
    return load_client()


def _workflow(name):
    return json.loads((WORKFLOWS / "api" / name).read_text())


def _run(client, server, workflow):
    status, body = client.post_prompt(server.url, workflow)
    assert status == 200, body
    entry = client.wait_history(server.url, body["prompt_id"], timeout=180)
    assert entry is not None, "no result in time:\n" + server.log()[-3000:]
    return entry


def test_object_info_lists_genesis_nodes(server):
    status, info = http_get(server.url + "/object_info")
    assert status == 200
    for name in ("GenesisAttentionSwitch", "GenesisBackendSelect", "GenesisCrossAttention", "GenesisAttentionMap",
                 "GenesisLatentToTensor", "GenesisTensorToLatent", "GenesisConditioningToTensor", "GenesisTensorInfo",
                 "GenesisMultiModalGen"):
        assert name in info, name
        assert info[name]["display_name"].startswith("Genesis ")
        assert info[name]["category"].startswith("genesis/")
        assert info[name]["description"]
    switch = info["GenesisAttentionSwitch"]
    assert switch["input"]["required"]["attention"][0] == ["auto", "flash", "sage", "xformers", "sdpa", "pytorch"]
    assert switch["input"]["required"]["attention"][1]["tooltip"]
    assert switch["output"] == ["MODEL"]
    assert info["GenesisTensorInfo"]["output_node"] is True


def test_genesis_backends_route(server):
    status, data = http_get(server.url + "/genesis/backends")
    assert status == 200
    names = {row["name"]: row for row in data["attention"]}
    assert {"sdpa", "pytorch", "flash", "sage", "xformers"} <= set(names)
    assert names["sdpa"]["available"] is True and names["sdpa"]["version"]
    for row in data["attention"]:
        assert row["available"] or row["reason"], row
    assert set(data["choices"]) == {"auto", "flash", "sage", "xformers", "sdpa", "pytorch"}
    compute = {row["name"]: row for row in data["compute"]}
    assert compute["cpu"]["available"] is True
    assert set(compute) == {"cuda", "cpu", "npu", "mps", "onnx", "rocm", "webgpu"}
    for row in data["compute"]:
        assert row["available"] or row["reason"], row


def test_web_extension_is_served(server):
    status, body = http_get(server.url + "/extensions/Genesis/genesis.js")
    assert status == 200 and b"registerExtension" in body


def test_cross_attention_workflow(server, client):
    entry = _run(client, server, _workflow("genesis_cross_attention.json"))
    assert client.execution_error(entry) is None, entry["status"]
    text = entry["outputs"]["5"]["text"][0]
    assert "shape [1x64x64]" in text and "NaN 0" in text
    images = entry["outputs"]["7"]["images"]
    assert images and images[0]["filename"].endswith(".png")


def test_latent_tokens_workflow(server, client):
    entry = _run(client, server, _workflow("genesis_latent_tokens.json"))
    assert client.execution_error(entry) is None, entry["status"]
    assert "shape [1x192x4]" in entry["outputs"]["7"]["text"][0]  # 128x96 image -> 16x12 latent, 4 channels


def test_multimodal_workflow_with_the_client_script(server):
    out = subprocess.run([sys.executable, str(WORKFLOWS / "run_api_workflow.py"),
                          str(WORKFLOWS / "api" / "genesis_multimodal.json"), "--server", server.url, "--timeout", "180"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shape [2x32x64]" in out.stdout


def test_unknown_attention_name_is_a_validation_error(server, client):
    wf = _workflow("genesis_cross_attention.json")
    wf["4"]["inputs"]["attention"] = "warp-drive"
    status, body = client.post_prompt(server.url, wf)
    # ComfyUI still runs the outputs that do not depend on the bad node (200), or refuses the prompt (400);
    # either way the bad node and input are named in node_errors.
    assert status in (200, 400)
    errors = body["node_errors"]["4"]["errors"]
    assert any(e["extra_info"].get("input_name") == "attention" for e in errors), errors
    assert "node 4 (GenesisCrossAttention): input attention" in client.describe_refusal(body)


def test_missing_link_is_a_validation_error(server, client):
    wf = _workflow("genesis_cross_attention.json")
    del wf["4"]["inputs"]["context"]
    status, body = client.post_prompt(server.url, wf)
    assert status in (200, 400)
    errors = body["node_errors"]["4"]["errors"]
    assert any(e["extra_info"].get("input_name") == "context" for e in errors), errors


def test_link_to_missing_node_is_refused(server, client):
    wf = _workflow("genesis_cross_attention.json")
    wf["4"]["inputs"]["query"] = ["99", 0]
    for node in ("6", "7"):  # leave only the output that depends on the broken link
        del wf[node]
    status, body = client.post_prompt(server.url, wf)
    assert status == 400, body


def test_wrong_tensor_rank_is_an_execution_error_naming_node_and_input(server, client):
    wf = _workflow("genesis_cross_attention.json")
    wf["4"]["inputs"]["query"] = ["6", 1]  # the 4-D attention weights where [B, N, D] tokens belong
    entry = _run(client, server, wf)
    err = client.execution_error(entry)
    assert err is not None, entry["status"]
    assert err["node_id"] == "4" and err["node_type"] == "GenesisCrossAttention"
    assert "input 'query' must be 3-D" in err["exception_message"]


def test_server_survives_bad_input(server, client):
    assert server.alive()
    entry = _run(client, server, _workflow("genesis_multimodal.json"))
    assert client.execution_error(entry) is None
