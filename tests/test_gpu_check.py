"""benchmarks/gpu_check.sh, the one-command device check of issue 32, kept from rotting.

``--cpu-smoke`` runs its three stages in miniature on the CPU (test_cuda.py with
``GRL_TEST_CUDA_DEVICE=cpu`` and without its torch.compile tests, a gloo torchrun job killed with
SIGKILL and resumed, the side-by-side benchmark at tiny sizes): about two minutes here. The
checks are on outcomes: the resumed run's losses equal the uninterrupted run's, grl-test gave a
PSNR, every benchmark cell was measured, the JSON has its keys, the summary table came last.
Timings are never asserted. Without CUDA, a plain run stops with one line.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(args, timeout):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("GRL_GPU_RESULTS", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _listing(folder: Path):
    return sorted(str(p) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "results"
    before = _listing(ROOT / "benchmarks" / "results")
    res = _run(["--cpu-smoke", "--out", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _listing(ROOT / "benchmarks" / "results") == before  # the smoke writes only into --out
    return res.stdout, json.loads((out / "gpu_check.json").read_text()), out


def test_smoke_job_resumes_exactly_and_tests_with_tiles(smoke):
    _, result, out = smoke
    assert result["ok"] and result["smoke"] and set(result["stages"]) == {"tests", "job", "bench"}
    tests = result["stages"]["tests"]
    assert tests["ok"] and tests["passed"] >= 5 and tests["failures"] == tests["errors"] == 0
    job = result["stages"]["job"]
    assert job["backend"] == "gloo" and job["amp"] == "bf16"
    assert job["checkpoint_at_kill"] and job["killed_after_iter"] == job["resumed_from_iter"] == 4
    assert job["resumed_iters"] == [5, job["iters"]]
    assert job["resumed_equal"] and job["resumed_mismatches"] == 0 and job["resumed_max_rel_diff"] == 0
    assert math.isfinite(job["test_psnr"]) and job["test_psnr"] > 5 and math.isfinite(job["bicubic_psnr"])
    assert job["test_tile"] == {"size": 16, "overlap": 4}
    assert not (out / "work").exists()  # scratch removed


def test_smoke_bench_measures_every_cell(smoke):
    _, result, _ = smoke
    bench = result["stages"]["bench"]
    assert bench["ok"] and bench["mm_gflops"]["bf16"] > 0 and bench["mm_gflops"]["fp32"] > 0
    names = [(r["name"], r["phase"], r["dtype"]) for r in bench["rows"]]
    assert names == [(n, p, d) for n, p in (("GRL-S@sr x2", "train"), ("GRL-B denoise", "train"),
                                            ("GRL-B@sr x4", "eval")) for d in ("fp32", "bf16")]
    for r in bench["rows"]:
        assert r["gflop"] > 0 and not r["errors"]
        assert set(r["impls"]) == {"official", "reference", "fast"}
        for v in r["impls"].values():
            assert v["img_per_s"] > 0 and v["gflops"] > 0 and math.isfinite(v["share_bf16_mm"])
            assert math.isnan(v["peak_mib"])  # CUDA only


def test_smoke_prints_the_summary_table_last(smoke):
    stdout, _, out = smoke
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"gpu_check: ALL OK; numbers in {out / 'gpu_check.json'}"
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0] == "| stage | result | numbers |"
    assert any(ln.startswith("| tests (cpu) | ok |") for ln in table)
    assert any(ln.startswith("| job (cpu) | ok |") and "losses equal" in ln for ln in table)
    assert sum(ln.startswith("| GRL-") for ln in table) == 6
    for stage in ("tests", "job", "bench"):
        assert json.loads((out / f"{stage}.json").read_text())["ok"]


@pytest.mark.parametrize("args, message", [
    (["--only", "tests,nope"], "--only: unknown stage 'nope'"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_bad_arguments_are_one_line(args, message, tmp_path):
    res = _run([*args, "--out", str(tmp_path)], timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpu_check.sh: error: {message}"), lines


def test_without_cuda_a_plain_run_is_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("checks the message given without CUDA")
    res = _run(["--out", str(tmp_path)], timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: error: no CUDA device"), lines


def test_device_job_options_are_valid(tmp_path):
    """The option files of the device-size job (GRL-S@sr geometry, CUDA prefetcher, tiles) pass
    the checks grl-train and grl-test make, without a GPU (file checks off: no data made)."""
    import yaml
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    from grl_plugin.cli.validate import validate_options
    sz = gpu_check._job_sizes(smoke=False)
    data = {"gt": str(tmp_path / "train_GT.lmdb"), "lq": str(tmp_path / "train_LQx2.lmdb"), "scale": 2,
            "keys": [], "size": sz["size"]}
    train = gpu_check._train_opt("job_ref", data, sz, smoke=False)
    assert train["train"]["amp"] == "bf16" and train["num_gpu"] == 1 and train["manual_seed"] == 32
    ds = train["datasets"]["train"]
    assert ds["prefetch_mode"] == "cuda" and ds["pin_memory"] is True and ds["num_worker_per_gpu"] == 0
    assert sz["kill_after"] % sz["ckpt"] == 0 and sz["kill_after"] < sz["iters"] == 200
    assert validate_options(train, "train", paths=False) == []
    test = yaml.safe_load(gpu_check._test_options_file(tmp_path, dict(data, gt=data["gt"]), tmp_path / "net.pth",
                                                       sz, smoke=False).read_text())
    assert test["val"]["tile"] == {"size": 64, "overlap": 16} and test["num_gpu"] == 1
    assert validate_options(test, "test", paths=False) == []
