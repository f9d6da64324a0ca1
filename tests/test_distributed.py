"""Meta-training across processes: 2 gloo ranks on this machine (loopback only) equal 1 process.

Every launch is a real ``torchrun`` (``python -m torch.distributed.run``) or a pair of processes
given the torchrun environment by hand, with one thread each.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learned_optim import distributed
from learned_optim.runstate import read_log

OPTIONS = ["--task", "sinusoid", "--meta-batch", "4", "--val-episodes", "2", "--test-episodes",
           "0", "--no-progress"]
TIMEOUT_S = 120  # any launch here takes < 30 s on 2 shared cores: more means a hang


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "LEARNED_OPTIM_DIST_TIMEOUT": "30", **extra}


def _single(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "learned_optim.cli", "meta-train", *OPTIONS, *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _torchrun_command(*args, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--standalone", "-m", "learned_optim.cli", "meta-train", *OPTIONS, *args]


def _torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_command(*args, processes=processes), env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _assert_same_weights(ours: Path, theirs: Path, tolerance: float = 1e-5) -> None:
    a = load_file(ours / "last.state.safetensors")
    b = load_file(theirs / "last.state.safetensors")
    modules = sorted(k for k in a if k.startswith("module/"))
    assert modules and modules == sorted(k for k in b if k.startswith("module/"))
    for key in modules:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tolerance, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """4 meta-steps of 4 episodes in one process: the reference."""
    run = tmp_path_factory.mktemp("single") / "run"
    result = _single("--meta-steps", "4", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    return run


def test_two_ranks_reach_the_weights_of_one_process_on_the_same_meta_batches(tmp_path,
                                                                              one_process):
    run = tmp_path / "run"
    result = _torchrun("--meta-steps", "4", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    _assert_same_weights(run, one_process)
    assert list(run.glob("*.jsonl")) == [run / "metrics.jsonl"]  # rank 0 alone writes
    assert [e["step"] for e in read_log(run) if "meta_loss" in e] == [1, 2, 3, 4]
    ours = [e["meta_loss"] for e in read_log(run) if "meta_loss" in e]
    theirs = [e["meta_loss"] for e in read_log(one_process) if "meta_loss" in e]
    assert ours == pytest.approx(theirs, rel=1e-5)  # the loss is averaged over the ranks
    assert result.stdout.count("best checkpoint:") == 1  # rank 0 alone reports


def test_distributed_resume_continues_to_the_weights_of_an_uninterrupted_run(tmp_path,
                                                                             one_process):
    run = tmp_path / "run"
    first = _torchrun("--meta-steps", "2", "--run-dir", str(run))
    assert first.returncode == 0, first.stderr
    resumed = _torchrun("--meta-steps", "4", "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(run, one_process)
    assert [e["step"] for e in read_log(run) if "meta_loss" in e] == [1, 2, 3, 4]


def test_every_rank_refuses_an_existing_run_instead_of_hanging(tmp_path):
    run = tmp_path / "run"
    assert _single("--meta-steps", "1", "--run-dir", str(run)).returncode == 0
    result = _torchrun("--meta-steps", "1", "--run-dir", str(run))
    assert result.returncode != 0
    for rank in (0, 1):  # rank 0 decides, both ranks report the same error
        assert f"(rank {rank} of 2): error: {run} already holds a run" in result.stderr


def test_meta_batch_must_split_evenly_across_the_ranks(tmp_path):
    result = _torchrun("--meta-steps", "1", "--meta-batch", "3", "--run-dir", str(tmp_path / "r"))
    assert result.returncode != 0
    assert "meta_batch 3 cannot be split evenly across 2 processes" in result.stderr
    assert not (tmp_path / "r").exists()


POISONED_RANK_1 = """
import sys
from learned_optim import distributed, train
from learned_optim.config import MetaTrainConfig

real = train.episode_query_loss

def poisoned(*args, **kwargs):  # rank 1's episodes go wrong; rank 0's are fine
    loss, metric = real(*args, **kwargs)
    if distributed.world()[0] == 1:
        if sys.argv[2] == "raise":
            raise FloatingPointError("non-finite gradient")
        loss = loss * float("nan")
    return loss, metric

train.episode_query_loss = poisoned
config = MetaTrainConfig(meta_steps=3, meta_batch=2, val_episodes=2, run_dir=sys.argv[1])
try:
    train.meta_train(config, progress=False)
except FloatingPointError as error:
    print(f"rank {distributed.world()[0]} stopped: {error}")
    sys.exit(3)
"""


@pytest.mark.parametrize("failure, rank_1_says, rank_0_says", [
    ("nan", "meta-loss is nan at meta-step 1", "meta-loss is nan at meta-step 1"),
    ("raise", "inner loop failed (non-finite gradient) at meta-step 1",
     "inner loop failed (on another rank) at meta-step 1"),
])
def test_a_failure_on_one_rank_stops_every_rank_through_the_python_api(tmp_path, failure,
                                                                       rank_1_says, rank_0_says):
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED_RANK_1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", str(script), str(tmp_path / "run"), failure]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode != 0
    assert f"rank 1 stopped: {rank_1_says}" in result.stdout
    assert f"rank 0 stopped: {rank_0_says}" in result.stdout
    assert [e["step"] for e in read_log(tmp_path / "run")] == [0]  # no step was taken


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_training(run: Path, processes) -> None:
    log = run / "metrics.jsonl"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if log.exists() and '"meta_loss"' in log.read_text():
            return
        assert all(p.poll() is None for p in processes), "a rank stopped before training"
        time.sleep(0.05)
    pytest.fail("training did not start")


def test_a_killed_rank_stops_the_others_with_a_clear_error(tmp_path):
    """Two ranks started by hand (no torchrun agent to clean up): rank 0 must not hang."""
    run = tmp_path / "run"
    common = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    command = [sys.executable, "-m", "learned_optim.cli", "meta-train", *OPTIONS,
               "--meta-steps", "100000", "--run-dir", str(run)]
    ranks = [subprocess.Popen(command, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        _wait_for_training(run, ranks)
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, stderr = ranks[0].communicate(timeout=TIMEOUT_S)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert ranks[0].returncode == 2
    assert time.time() - killed_at < 30  # the broken connection, not the timeout, stopped it
    assert "(rank 0 of 2): error: lost contact with the other ranks during" in stderr
    assert "restart every rank with --resume" in stderr
    assert (run / "last.state.safetensors").exists()


def _worker_of_rank(agent: subprocess.Popen, rank: int) -> int | None:
    """PID of torchrun's worker process with ``RANK=rank`` (Linux /proc)."""
    for task in Path(f"/proc/{agent.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds workers through /proc")
def test_torchrun_stops_the_whole_run_when_a_rank_is_killed(tmp_path):
    run = tmp_path / "run"
    agent = subprocess.Popen(_torchrun_command("--meta-steps", "100000", "--run-dir", str(run)),
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for_training(run, [agent])
        worker = _worker_of_rank(agent, 1)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        _, stderr = agent.communicate(timeout=TIMEOUT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert agent.returncode != 0
    assert "learned_optim.cli FAILED" in stderr
    assert re.search(r"rank\s*:\s*1\b", stderr) and "Signal 9 (SIGKILL)" in stderr


def test_a_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == (0, 1)
    assert distributed.init_from_env("cpu") is False  # nothing to join
    assert list(distributed.rank_slots(4)) == [0, 1, 2, 3]
    assert distributed.on_main(lambda: 7) == 7
    grads = [torch.ones(3)]
    distributed.all_reduce_sum_(grads)
    assert grads[0].tolist() == [1.0, 1.0, 1.0]


def test_rank_slots_partition_the_meta_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    shares = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(list(distributed.rank_slots(8)))
    assert shares == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sorted(sum(shares, [])) == list(range(8))


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == 300
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_s() == 12.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="LEARNED_OPTIM_DIST_TIMEOUT must be a number"):
        distributed.timeout_s()
