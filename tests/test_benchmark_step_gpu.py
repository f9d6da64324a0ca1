"""benchmarks/step_gpu.py: the GPU step check, smoke-run on the CPU (its arithmetic, its
compiled candidate's agreement with the optimizer, and its refusal without CUDA)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_gpu.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)


def test_smoke_run_on_the_cpu_prints_the_floor_ratio_and_a_verdict():
    done = run("--device", "cpu", "--sizes", "20k,200k", "--quick")
    assert done.returncode in (0, 1), done.stderr
    out = done.stdout
    bandwidth = float(re.search(r"copy bandwidth ([\d.]+) GB/s", out).group(1))
    assert bandwidth > 0.1
    rows = re.findall(r"^\s+([\d.]+k)" + r"\s+([\d.]+)" * 8 + "$", out, flags=re.M)
    assert [row[0] for row in rows] == ["20.0k", "199.7k"], out
    for n, ours, chunks, compiled, sgd, floor, ours_ratio, chunks_ratio, _ in rows:
        coordinates = float(n[:-1]) * 1e3
        # floor = 348 bytes a coordinate at the measured bandwidth (rounded as printed)
        assert float(floor) == pytest.approx(348 * coordinates / (bandwidth * 1e9) * 1e3,
                                             rel=0.05, abs=2e-3)
        assert float(ours_ratio) == pytest.approx(float(ours) / float(floor), rel=0.05, abs=0.1)
        assert float(chunks_ratio) == pytest.approx(float(chunks) / float(ours), rel=0.05,
                                                    abs=0.02)
        assert float(ours) > float(sgd) > 0 and float(compiled) > 0
    # the compiled candidate and the chunk path compute the optimizer's step
    for diff in re.findall(r"max \|diff\| ([\d.e+-]+)", out):
        assert float(diff) < 1e-5
    assert len(re.findall(r"(chunks|compiled) vs ours after one step: max \|diff\|", out)) == 4
    # the default optimizer on the many-tensor model, against Adam and SGD
    many = re.search(r"on 64 blocks of Linear\(256, 256\) \+ LayerNorm \(4.24M parameters in "
                     r"256 tensors\): ([\d.]+) ms, ([\d.]+)x Adam's \(([\d.]+) ms\)", out)
    assert many, out
    assert float(many.group(2)) == pytest.approx(float(many.group(1)) / float(many.group(3)),
                                                 rel=0.05, abs=0.1)
    verdict = re.search(r"^(PASS|FAIL): step\(\) at N = 199.7k on CPU = ([\d.]+)x", out, re.M)
    assert verdict and (verdict.group(1) == "PASS") == (done.returncode == 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_refuses_cuda_without_a_device():
    done = run("--sizes", "10k")
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr
