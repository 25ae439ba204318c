#!/usr/bin/env python3
"""Post an API-format workflow to a running ComfyUI, wait for it, print its outputs. Standard library only.

    python example_workflows/run_api_workflow.py example_workflows/api/genesis_cross_attention.json
    python example_workflows/run_api_workflow.py WORKFLOW.json --server http://127.0.0.1:8188 --timeout 300

Exit status: 0 when the prompt ran, 2 when ComfyUI refused it (validation errors are printed per node and
input), 3 when it failed while running (the node and the exception are printed), 4 on a timeout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Optional, Tuple


def _request(url: str, data: Optional[dict] = None, timeout: float = 30.0) -> Tuple[int, Any]:
    body = None if data is None else json.dumps(data).encode("utf-8")
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read().decode("utf-8") or "null")
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, text


def post_prompt(server: str, workflow: Dict[str, Any], client_id: Optional[str] = None) -> Tuple[int, Any]:
    """POST /prompt; returns (HTTP status, JSON body): 200 with prompt_id, or 400 with error and node_errors."""
    return _request(f"{server.rstrip('/')}/prompt", {"prompt": workflow, "client_id": client_id or uuid.uuid4().hex})


def wait_history(server: str, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> Optional[Dict[str, Any]]:
    """Poll /history/<id> until the prompt finished (success or error); None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = _request(f"{server.rstrip('/')}/history/{prompt_id}")
        if status == 200 and isinstance(body, dict) and prompt_id in body:
            entry = body[prompt_id]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return entry
        time.sleep(poll)
    return None


def execution_error(entry: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The execution_error message of a failed history entry (node_id, node_type, exception_message), if any."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def describe_refusal(body: Any) -> str:
    """Human-readable lines for a 400 answer of /prompt."""
    if not isinstance(body, dict):
        return str(body)
    err = body.get("error")
    lines = [f"refused: {err.get('message') if isinstance(err, dict) else err}"] if err else []
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            extra = err.get("extra_info", {})
            lines.append(f"  node {node_id} ({info.get('class_type')}): input {extra.get('input_name', '?')}: "
                         f"{err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", help="API-format workflow JSON file")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")
    args = parser.parse_args(argv)

    with open(args.workflow, encoding="utf-8") as fh:
        workflow = json.load(fh)
    status, body = post_prompt(args.server, workflow)
    if status != 200:
        print(describe_refusal(body))
        return 2
    prompt_id = body["prompt_id"]
    if body.get("node_errors"):
        print("some outputs were dropped:\n" + describe_refusal(body))
    print(f"queued {prompt_id}")
    entry = wait_history(args.server, prompt_id, args.timeout)
    if entry is None:
        print(f"no result within {args.timeout:.0f} s")
        return 4
    err = execution_error(entry)
    if err is not None:
        print(f"failed in node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}")
        return 3
    for node_id, outputs in entry.get("outputs", {}).items():
        title = workflow.get(node_id, {}).get("_meta", {}).get("title", workflow.get(node_id, {}).get("class_type"))
        for key, value in outputs.items():
            shown = value if key != "images" else [f"{im.get('subfolder', '')}/{im.get('filename')}" for im in value]
            print(f"node {node_id} ({title}) {key}: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
