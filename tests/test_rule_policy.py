"""learned_optim.rule.policy: every chunk and replay size, per device, in one place."""

import os
import subprocess
import sys

import torch

from learned_optim.rule import policy

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_cpu_chunks_are_cache_sized_and_accelerator_chunks_large():
    for rows in (policy.forward_chunk_rows, policy.backward_chunk_rows, policy.step_chunk_rows):
        assert rows(CPU) == 8192
        assert rows(CUDA) == policy.ACCELERATOR_CHUNK_ROWS == 2**18
    assert policy.replay_chunk_bytes(CPU) == 48 * 2**20
    assert policy.replay_chunk_bytes(CUDA) == 2**30


def test_replay_chunks_fit_the_budget_within_bounds(monkeypatch):
    assert policy.replay_chunk_rows(CPU, 10**6, 12, 900) == 48 * 2**20 // (12 * 900)
    assert policy.replay_chunk_rows(CPU, 100, 12, 900) == 100  # never more than the rows
    monkeypatch.setattr(policy, "REPLAY_CHUNK_BYTES", 1)
    assert policy.replay_chunk_rows(CPU, 10**6, 12, 900) == policy.MIN_REPLAY_CHUNK_ROWS


def test_the_sizes_are_read_at_call_time(monkeypatch):
    monkeypatch.setattr(policy, "FORWARD_CHUNK_ROWS", 16)
    assert policy.forward_chunk_rows(CPU) == 16


def test_small_loops_on_a_cpu_run_on_one_thread_and_others_keep_torch_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(policy, "busy_cores", lambda: 0)
    monkeypatch.setattr(policy, "usable_cores", lambda: 2)
    assert policy.chunk_loop_threads(CPU, policy.PARALLEL_MIN_ROWS - 1) == 1
    assert policy.chunk_loop_threads(CPU, policy.PARALLEL_MIN_ROWS) is None  # idle: 2 threads
    assert policy.chunk_loop_threads(CUDA, 10) is None  # threads are the CPU's concern


def test_a_large_loop_runs_on_one_thread_when_fewer_cores_are_free_than_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(policy, "usable_cores", lambda: 2)
    monkeypatch.setattr(policy, "busy_cores", lambda: 1)  # one other busy process
    assert policy.chunk_loop_threads(CPU, 10**6) == 1


def test_the_thread_limit_is_restored_after_the_loop():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with policy.threads_for_chunk_loop(CPU, 100):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_tape_path_records_op_by_op_only_below_the_threshold_on_one_cpu_thread(monkeypatch):
    monkeypatch.setattr(policy, "RECORDED_MAX_ROWS", 4096)
    monkeypatch.setattr(policy, "COMPILE_RULE", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert policy.tape_path(CPU, 4096, first_order=True) == "recorded"
    assert policy.tape_path(CPU, 4097, first_order=True) == "trajectory"
    assert policy.tape_path(CPU, 4097, first_order=False) == "recomputed"
    assert policy.tape_path(CUDA, 10, first_order=True) == "trajectory"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # its backward is out of reach
    assert policy.tape_path(CPU, 10, first_order=True) == "trajectory"


def test_cpu_steps_of_the_compiled_range_take_the_native_node_in_either_order(monkeypatch):
    assert policy.RECORDED_MAX_ROWS == 0
    low, high = policy.COMPILED_MIN_ROWS, policy.COMPILED_MAX_ROWS
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    for rows in (low, 28_485, high):
        assert policy.tape_path(CPU, rows, first_order=True) == "native"
        assert policy.tape_path(CPU, rows, first_order=False) == "native"
    for rows in (1, low - 1, high + 1, 10**7):  # too cheap to matter; temporaries too large
        assert policy.tape_path(CPU, rows, first_order=True) == "trajectory"
        assert policy.tape_path(CPU, rows, first_order=False) == "recomputed"
    monkeypatch.setattr(policy, "COMPILE_RULE", False)  # LEARNED_OPTIM_COMPILE=0
    assert policy.tape_path(CPU, 28_485, first_order=True) == "trajectory"


def test_cuda_second_order_steps_up_to_the_bound_take_the_triton_node(monkeypatch):
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    for rows in (1, 28_485, policy.COMPILED_MAX_ROWS):
        assert policy.tape_path(CUDA, rows, first_order=False) == "triton"
        # first order keeps the trajectory (its kernels are Triton's there): 4 bytes a
        # coordinate and step on the tape, where a node saves 176
        assert policy.tape_path(CUDA, rows, first_order=True) == "trajectory"
    assert policy.tape_path(CUDA, policy.COMPILED_MAX_ROWS + 1,
                            first_order=False) == "recomputed"
    monkeypatch.setattr(policy, "COMPILE_RULE", False)
    assert policy.tape_path(CUDA, 28_485, first_order=False) == "recomputed"


def test_the_compile_switch_reads_the_environment():
    code = "from learned_optim.rule import policy; print(policy.COMPILE_RULE)"
    for value, expected in (("0", "False"), ("no", "False"), ("1", "True"), ("", "True")):
        env = {**os.environ, "LEARNED_OPTIM_COMPILE": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == expected, value


def test_tape_steps_of_the_compiled_range_keep_torchs_threads(monkeypatch):
    """Its fused loops are few, and a changed thread count would compile its graphs again."""
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert policy.tape_step_threads(CPU, 28_485) is None
    assert policy.tape_step_threads(CPU, policy.COMPILED_MIN_ROWS - 1) == 1  # a chunk loop's
    monkeypatch.setattr(policy, "COMPILE_RULE", False)
    assert policy.tape_step_threads(CPU, 28_485) == 1


def test_float32_cpu_steps_take_the_native_kernel_on_torchs_threads(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    monkeypatch.setattr(policy, "busy_cores", lambda: 0)
    assert policy.step_native(cpu, torch.float32)
    assert not policy.step_native(cpu, torch.float64) and not policy.step_native(cuda,
                                                                                 torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # any size, even below the compiled range: the kernel is one call a parameter
        assert policy.step_threads(cpu, torch.float32, 100, 8192) is None
        assert policy.step_threads(cpu, torch.float64, 100, 8192) == 1
        monkeypatch.setattr(policy, "COMPILE_RULE", False)
        assert not policy.step_native(cpu, torch.float32)
        assert policy.step_threads(cpu, torch.float32, 100, 8192) == 1
    finally:
        torch.set_num_threads(before)


def test_a_meta_step_runs_on_one_thread_only_while_other_processes_hold_cores(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(policy, "usable_cores", lambda: 2)
    monkeypatch.setattr(policy, "busy_cores", lambda: 0)
    assert policy.meta_step_threads(CPU) is None  # idle: torch's threads
    monkeypatch.setattr(policy, "busy_cores", lambda: 1)
    assert policy.meta_step_threads(CPU) == 1
    assert policy.meta_step_threads(CUDA) is None
    monkeypatch.setattr(policy, "busy_cores", lambda: 3)  # more busy than cores: still one
    assert policy.meta_step_threads(CPU) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(policy, "usable_cores", lambda: 16)
    monkeypatch.setattr(policy, "busy_cores", lambda: 1)
    assert policy.meta_step_threads(CPU) == 15  # the free cores, not one
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert policy.meta_step_threads(CPU) is None


def test_busy_cores_leave_this_process_own_running_threads_out(monkeypatch):
    assert policy._own_running_threads() >= 1  # the caller is running
    with open("/proc/loadavg") as handle:
        running = int(handle.read().split()[3].split("/")[0])
    monkeypatch.setattr(policy, "_own_running_threads", lambda: running + 5)
    assert policy.busy_cores() == 0  # our own spinning OpenMP workers are not other processes
    monkeypatch.setattr(policy, "_own_running_threads", lambda: 1)
    assert policy.busy_cores() >= 0
