"""Smoke test of benchmarks/bench_cuda.py, the device benchmark, on the CPU.

Runs ``--device cpu --quick`` (GRL-T, batch 2 x 32^2, fp32 and bf16, memory at 64^2) in a
subprocess and checks the JSON rows and the printed tables: timings and FLOP rates finite and
positive, fast and reference outputs equal in fp32, memory ``nan`` off CUDA. Timings are never
asserted. Without CUDA, ``--device cuda`` must stop with a one-line message.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_cuda.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_benchmark(SCRIPT.name, ["--device", "cpu", "--quick"], tmp_path_factory.mktemp("bench_cuda"), 600)


def test_throughput_rows(quick_run):
    _, rows = quick_run
    assert [(r["config"], r["dtype"]) for r in rows["throughput"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for r in rows["throughput"]:
        assert r["batch"] == 2 and r["patch"] == 32
        for phase in ("fwd_s", "train_s"):
            assert set(r[phase]) == {"reference", "fast"}
            assert all(math.isfinite(v) and v > 0 for v in r[phase].values())
        assert all(math.isnan(v) for v in r["train_peak_mib"].values())  # CUDA only
    fp32, bf16 = rows["throughput"]
    assert fp32["delta"] <= 1e-4  # same network, same weights
    assert math.isfinite(bf16["delta"]) and bf16["delta"] < 0.5


def test_memory_and_flops_rows(quick_run):
    stdout, rows = quick_run
    (mem,) = rows["memory"]
    assert mem["size"] == 64 and set(mem["train_mib"]) == {"reference", "fast", "fast_ckpt"}
    assert all(math.isnan(v) for v in mem["train_mib"].values())
    for r in rows["flops"]:
        assert r["gflop"] > 0 and r["gflops"] > 0 and r["mm_gflops"] > 0
    # one FLOP count per config, shared by both dtypes
    assert rows["flops"][0]["gflop"] == rows["flops"][1]["gflop"]
    headers = [line for line in stdout.splitlines() if line.startswith("| config")]
    assert len(headers) == 3 and "fast % of mm" in headers[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_no_cuda_is_one_clear_line():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA device" in lines[0]


def test_compile_option_wraps_both_paths(monkeypatch):
    """``--compile MODE``: both paths of the throughput table go through ``torch.compile`` with
    that mode (a spy here: compiling takes minutes on a CPU), and the row and table say so."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_cuda
    modes = []

    def spy(module, mode=None):
        modes.append(mode)
        return module
    monkeypatch.setattr(torch, "compile", spy)
    row = bench_cuda.throughput("tiny", "fp32", torch.device("cpu"), 1, 16, 1, 0, compile_mode="reduce-overhead")
    assert modes == ["reduce-overhead"] * 2 and row["compile"] == "reduce-overhead"
    assert row["delta"] <= 1e-4
    assert "| tiny (compiled, reduce-overhead) | fp32 |" in bench_cuda.format_throughput([row])
    plain = bench_cuda.throughput("tiny", "fp32", torch.device("cpu"), 1, 16, 1, 0)
    assert modes == ["reduce-overhead"] * 2 and plain["compile"] is None
    assert "| tiny | fp32 |" in bench_cuda.format_throughput([plain])


def test_compile_regional_compiles_every_block_of_both_paths(monkeypatch):
    """``--compile MODE --regional``: the GRL blocks' token forward of both paths goes through
    ``torch.compile`` with that mode (a spy; once per path, bound to every block), the network
    itself does not, and the row says so."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_cuda
    from grl_plugin.layers import GRLBlock
    compiled, built = [], []

    def spy(fn, mode=None):
        compiled.append((fn, mode))
        return fn
    monkeypatch.setattr(torch, "compile", spy)
    build = bench_cuda.build
    monkeypatch.setattr(bench_cuda, "build", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    row = bench_cuda.throughput("tiny", "fp32", torch.device("cpu"), 1, 16, 1, 0, compile_mode="reduce-overhead",
                                regional=True)
    assert compiled == [(GRLBlock.forward_tokens, "reduce-overhead")] * 2
    blocks = [m for net in built[0].values() for m in net.modules() if isinstance(m, GRLBlock)]
    assert len(blocks) > 2 and all(vars(b)["forward_tokens"].__self__ is b for b in blocks)
    assert not any(hasattr(net, "_orig_mod") for net in built[0].values())
    assert row["compile"] == "reduce-overhead, per block" and row["delta"] <= 1e-4
    assert "| tiny (compiled, reduce-overhead, per block) | fp32 |" in bench_cuda.format_throughput([row])


def test_regional_without_compile_is_one_clear_line():
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--regional"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines()[-1].endswith("--regional compiles each block with the --compile MODE: "
                                                         "give --compile too")
