"""The efficiency benchmark (scripts/benchmark_efficiency.py) runs end to end and writes parseable
outputs; torch.compile'd LEIGNN inference gives eager's numbers. No timing is asserted: timings
depend on the machine."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from leignn_ocp import bench
from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.model import LEIGNN

from conftest import REPO, cli_env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_efficiency.py"), "--tiny", "--out", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _finite(x: str) -> bool:
    return math.isfinite(float(x))


def test_tiny_benchmark_csv_has_every_model_with_finite_numbers(tiny_run):
    with open(tiny_run / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == list(bench.MODELS)
    numeric = ["params", "edges", "gflop_fwd", "gflop_train", "train_ms", "infer_ms", "train_atoms_per_s",
               "infer_atoms_per_s", "peak_mem_train_mb", "peak_mem_infer_mb", "train_x_leignn", "infer_x_leignn",
               "train_cpu_ms", "infer_cpu_ms", "train_cpu_x_leignn", "infer_cpu_x_leignn"]
    for r in rows:
        for k in numeric:
            assert _finite(r[k]), (r["model"], k, r[k])
        assert int(r["params"]) > 0 and int(r["edges"]) > 0
        assert float(r["train_ms"]) > 0 and float(r["infer_ms"]) > 0
    leignn = rows[0]
    assert float(leignn["train_x_leignn"]) == 1.0 and float(leignn["infer_x_leignn"]) == 1.0


def test_tiny_benchmark_markdown_json_and_figure(tiny_run):
    md = (tiny_run / "benchmark.md").read_text()
    for spec in bench.MODELS.values():
        assert f"| {spec[1]} |" in md
    assert "% of the matmul rate" in md
    meta = json.loads((tiny_run / "benchmark.json").read_text())["meta"]
    assert meta["tiny"] is True and meta["matmul_gflops"] > 0
    assert 0 < meta["leignn_matmul_fraction"] and math.isfinite(meta["leignn_matmul_fraction"])
    png = (tiny_run / "benchmark.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # ~30 s: inductor compiles the graph pieces on CPU
def test_compiled_inference_equals_eager():
    """torch.compile (inductor, dynamic shapes) of a small LEIGNN under torch.no_grad: the same
    energies and direct forces as eager, on a periodic batch of two structures."""
    torch.manual_seed(0)
    model = LEIGNN(hidden_channels=16, num_layers=2, num_rbf=32, cutoff=6.0, max_neighbors=20,
                   zero_init_energy=False).eval()
    atoms = bench.oc20_like_structures(2, tiny=True)
    data = atoms_to_batch(atoms, torch.float32)
    compiled = torch.compile(model, dynamic=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model(data.clone())
        out = compiled(data.clone())
        again = compiled(data.clone())
    print(f"\n[compile] first compiled call {time.perf_counter() - t0:.1f} s")
    for o in (out, again):
        torch.testing.assert_close(o["energy"], ref["energy"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(o["forces"], ref["forces"], rtol=1e-5, atol=1e-5)
    assert ref["forces"].abs().max() > 1e-4
