"""Smoke test of benchmarks/bench_vs_swinir.py (GRL vs SwinIR at matched parameter count).

Runs ``--quick`` (GRL-T vs its SwinIR match, 32x32, one round) in a subprocess and checks the
printed tables and the JSON rows: every number finite and positive, parameter counts matched
within the tolerance. Timings are never asserted.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_vs_swinir.py"
TOL = 0.10


def _tables(text: str):
    """Markdown tables of ``text`` as lists of rows (header first, separator dropped)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") and c for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _numbers(cell: str):
    return [float(v) for v in cell.split("/")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_benchmark(SCRIPT.name, ["--quick", "--threads", "1"], tmp_path_factory.mktemp("bench"))


def test_quick_tables(quick_run):
    stdout, _ = quick_run
    assert "threads 1" in stdout.splitlines()[0]
    models, results = _tables(stdout)[-2:]
    assert models[0][0] == "model" and "params GRL/SwinIR" in models[0]
    assert [r[0] for r in models[1:]] == ["tiny"]
    row = dict(zip(models[0], models[1]))
    assert abs(float(row["params GRL/SwinIR"]) - 1) <= TOL
    assert float(row["GRL params (M)"]) > 0 and float(row["SwinIR params (M)"]) > 0

    head = results[0]
    assert len(results) == 2 and results[1][:2] == ["tiny", "32x32"]
    cells = dict(zip(head, results[1]))
    fwd_mem = _numbers(cells["+peak MiB fwd GRL/SwinIR"])
    for name, cell in cells.items():
        if name in ("model", "input"):
            continue
        if name == "+peak MiB fwd GRL/SwinIR":  # an eval forward at 32x32 may not raise the peak
            assert all(math.isfinite(v) and v >= 0 for v in fwd_mem), cell
        elif name == "fwd mem GRL/SwinIR":  # "nan" when the SwinIR forward did not raise it
            assert cell == "nan" if fwd_mem[1] == 0 else math.isfinite(float(cell)) and float(cell) >= 0, cell
        else:
            for v in _numbers(cell):
                assert math.isfinite(v) and v > 0, (name, cell)
    for col in ("fwd GRL/SwinIR", "train GRL/SwinIR", "fwd mem GRL/SwinIR", "train mem GRL/SwinIR",
                "% of mm GRL/SwinIR", "% of best GRL/SwinIR", "mm GFLOP/s", "oneDNN GFLOP/s"):
        assert col in head


def test_quick_json(quick_run):
    _, data = quick_run
    assert data["meta"]["threads"] == 1
    (spec,) = data["specs"]
    assert spec["swinir_kwargs"]["embed_dim"] % spec["swinir_kwargs"]["num_heads"][0] == 0
    (row,) = data["rows"]
    assert abs(row["grl_params"] / row["swinir_params"] - 1) <= TOL
    for key in ("fwd", "train", "flops", "gflops_per_s", "pct_of_mm", "pct_of_best"):
        for arch in ("grl", "swinir"):
            assert math.isfinite(row[key][arch]) and row[key][arch] > 0, (key, arch)
    # % of best: of the better of the two measured matmul rates, so never above % of mm
    best = max(row["mm_gflops_per_s"], row["onednn_gflops_per_s"])
    for arch in ("grl", "swinir"):
        assert row["pct_of_best"][arch] <= row["pct_of_mm"][arch] + 1e-9
        assert abs(row["pct_of_best"][arch] - 100 * row["gflops_per_s"][arch] / best) <= 1e-6
    for arch in ("grl", "swinir"):
        assert "error" not in row["mem"][arch], row["mem"][arch]
        assert math.isfinite(row["mem"][arch]["train"]) and row["mem"][arch]["train"] > 0
    assert row["mm_gflops_per_s"] > 0


def test_flop_count_includes_fused_attention():
    """The fused CPU attention kernel has no formula in torch's counter; the benchmark's count of
    the fast path must equal the explicit-matmul reference path's (bias cache off, so both run
    the position-bias MLP every forward)."""
    import importlib.util

    import torch

    import grl_plugin

    spec = importlib.util.spec_from_file_location("bench_vs_swinir_under_test", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = grl_plugin.GRL(upscale=2, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2],
                           window_size=8, stripe_size=[16, 16], anchor_window_down_factor=2,
                           upsampler="pixelshuffledirect").eval()
    x = torch.rand(1, 3, 20, 24)
    model.configure(bias_cache_mib=0)
    fast = bench._count_flops(torch, model, x)
    model.set_attn_impl("reference")
    reference = bench._count_flops(torch, model, x)
    assert fast == reference > 0
