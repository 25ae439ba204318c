"""scripts/gpu/scaleout.py --cpu-dry-run: the multi-GPU benchmark's own logic on gloo CPU processes, tiny shapes:
it runs 1 and 4 workers (Ulysses 2 x ring 2 where 6 heads do not divide by 4), writes its JSON, and the sharded outputs equal the
one-process output."""
from __future__ import annotations

import json
import subprocess
import sys

from comfy_helpers import REPO


def test_scaleout_dry_run_writes_its_report(tmp_path):
    out = tmp_path / "scaleout.json"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu" / "scaleout.py"), "--cpu-dry-run", "--gpus", "1,4",
           "--workloads", "wan-75k", "--blocks", "1", "--iters", "1", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=str(REPO))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["workload"], r["gpus"]): r for r in report["runs"]}
    assert set(rows) == {(w, g) for w in ("wan-75k",) for g in (1, 4)}
    assert rows[("wan-75k", 4)]["ulysses"] == 2 and rows[("wan-75k", 4)]["ring"] == 2  # 6 heads on 4 ranks
    for (w, g), r in rows.items():
        assert r["step_s_extrapolated"] > 0
        if g > 1:
            assert r["rel_diff_vs_1gpu"] < 1e-5, (w, g, r["rel_diff_vs_1gpu"])
            assert 0 < r["collective_share"] < 1
            assert r["efficiency"] > 0 and r["speedup"] > 0
