"""benchmarks/bench_tricks.py runs, switches each trick off without changing the output, and
reports what the trick table of benchmarks/README.md is made of (timings are not asserted)."""
import math

from helpers import run_benchmark


def test_quick_run_switches_tricks_off_with_the_same_output(tmp_path):
    out, data = run_benchmark("bench_tricks.py", ["--quick", "--tricks", "mask_columns", "lean_mlp_norm", "--no-memory"],
                              tmp_path)
    rows = data["rows"]
    assert {r["trick"] for r in rows} == {"mask_columns", "lean_mlp_norm"}  # (large_index_plans: the next test)
    for r in rows:
        assert r["on_s"] > 0 and r["off_s"] > 0 and math.isfinite(r["time_gain"])
        assert r["max_abs_diff"] <= 1e-5, r  # the same function with and without the trick
        assert r["config"] in ("tiny", "tiny@sr") and r["size"] == 32
    assert data["meta"]["device"].startswith("cpu: ") and data["meta"]["torch"] and data["meta"]["date"]
    assert data["meta"]["command"].startswith("bench_tricks.py --quick")
    assert "| mask_columns | tiny@sr | eval |" in out


def test_a_trick_switched_off_really_changes_the_path(tmp_path):
    """The large-index plans off: the CPU eval no longer takes the grouped kernel."""
    import sys
    from pathlib import Path

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_tricks
    from grl_plugin.layers.kernels import cpu

    calls = []
    real = cpu._grouped_flash
    cpu._grouped_flash = lambda *a: calls.append(1) or real(*a)
    try:
        torch_, net, x, target = bench_tricks._model("tiny@sr", 64, False)
        net.configure(bias_cache_mib=0)  # no room for biases: large windows take the grouped kernel
        bench_tricks._step(torch_, net, x, target, "eval")
        on = len(calls)
        with bench_tricks._off(bench_tricks._tricks()["large_index_plans"][2]):
            bench_tricks._step(torch_, net, x, target, "eval")
        assert on > 0 and len(calls) == on
    finally:
        cpu._grouped_flash = real
