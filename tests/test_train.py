"""Meta-training: the routine, its run folder, resumption after SIGKILL, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learned_optim import load_checkpoint
from learned_optim import train as train_module
from learned_optim.config import MetaTrainConfig, load_config
from learned_optim.runstate import read_log
from learned_optim.train import MetaTrainer, meta_train

FAST = dict(meta_batch=2, val_episodes=5, validate_every=10, checkpoint_every=5)


def test_run_folder_holds_config_log_state_and_best(tmp_path):
    config = MetaTrainConfig(meta_steps=12, run_dir=str(tmp_path / "run"), **FAST)
    best = meta_train(config, progress=False)
    folder = tmp_path / "run"
    assert best == folder / "best.safetensors"
    log = read_log(folder)
    assert [e["step"] for e in log if "meta_loss" in e] == list(range(1, 13))
    assert [e["step"] for e in log if "val_mse" in e] == [0, 10, 12]
    checkpoint = load_checkpoint(best)
    assert checkpoint.record["config"]["meta_steps"] == 12
    assert checkpoint.record["config"]["inner_steps"] == 5
    assert set(checkpoint.learned_init) == {"features.0.weight", "features.0.bias",
                                            "features.2.weight", "features.2.bias",
                                            "head.weight", "head.bias"}
    assert checkpoint.record["metrics"]["val_episodes"] == 5


def test_meta_training_updates_rule_and_init(tmp_path):
    config = MetaTrainConfig(meta_steps=3, run_dir=str(tmp_path / "run"), **FAST)
    trainer = MetaTrainer(config, progress=False)
    rule = [p.detach().clone() for p in trainer.rule.parameters()]
    init = [p.detach().clone() for p in trainer.learner.parameters()]
    trainer.meta_step()
    assert all(not torch.equal(a, b) for a, b in zip(rule, trainer.rule.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(init, trainer.learner.parameters()))


def test_existing_run_is_not_overwritten(tmp_path):
    config = MetaTrainConfig(meta_steps=1, run_dir=str(tmp_path / "run"), **FAST)
    meta_train(config, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        meta_train(config, progress=False)


def test_resume_refuses_a_changed_configuration(tmp_path):
    config = MetaTrainConfig(meta_steps=1, run_dir=str(tmp_path / "run"), **FAST)
    meta_train(config, progress=False)
    changed = MetaTrainConfig(meta_steps=2, run_dir=str(tmp_path / "run"), shots=5,
                              **FAST)
    with pytest.raises(ValueError, match=r"differs in \['queries', 'shots'\]"):
        meta_train(changed, resume=True, progress=False)


def test_resume_without_state_is_a_clear_error(tmp_path):
    config = MetaTrainConfig(meta_steps=1, run_dir=str(tmp_path / "none"), **FAST)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        meta_train(config, resume=True, progress=False)


def test_non_finite_meta_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    config = MetaTrainConfig(meta_steps=20, run_dir=str(tmp_path / "run"), **FAST)
    real = train_module.episode_query_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, metric = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 12 else loss), metric

    monkeypatch.setattr(train_module, "episode_query_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"meta-loss is nan at meta-step 7.*last good"):
        meta_train(config, progress=False)
    state = load_file(tmp_path / "run" / "last.state.safetensors")
    assert all(torch.isfinite(t).all() for k, t in state.items() if t.is_floating_point())
    assert load_checkpoint(tmp_path / "run" / "best.safetensors").record["card"]["meta_steps"] == 0


def _cli(*args):
    return [sys.executable, "-m", "learned_optim.cli", "meta-train", "--no-progress",
            "--test-episodes", "0", "--meta-batch", "2", "--val-episodes", "3",
            "--validate-every", "10", "--checkpoint-every", "5", "--meta-steps", "40", *args]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli("--run-dir", str(reference)), check=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli("--run-dir", str(killed)), env=env)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if sum('"meta_loss"' in line for line in lines) >= 17:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    partial = read_log(killed)
    assert max(e["step"] for e in partial) < 40  # really interrupted

    subprocess.run(_cli("--run-dir", str(killed), "--resume"), check=True, env=env, timeout=300)
    ours = load_file(killed / "last.state.safetensors")
    theirs = load_file(reference / "last.state.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.startswith(("module/", "optimizer/")):
            assert torch.equal(ours[key], theirs[key]), key
    steps = [e["step"] for e in read_log(killed) if "meta_loss" in e]
    assert steps == list(range(1, 41))  # the log has no duplicated or missing steps


def test_config_file_and_its_errors(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('task = "omniglot"\nshots = 5\nways = 20\n')
    config = load_config(good).resolved()
    assert (config.ways, config.shots, config.inner_steps, config.bn_momentum) == (20, 5, 8, 0.95)
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "omniglot"\nshotz = 5\n')
    expected = r"bad.toml: unknown configuration option\(s\) \['shotz'\]"
    with pytest.raises(ValueError, match=expected):
        load_config(bad)
    with pytest.raises(ValueError, match="task must be one of"):
        MetaTrainConfig(task="cifar")
    with pytest.raises(ValueError, match="meta_batch must be a positive integer"):
        MetaTrainConfig(meta_batch=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Path(tmp_path / "missing.toml"))


def test_classification_task_without_data_root_says_what_to_pass(tmp_path):
    config = MetaTrainConfig(task="omniglot", run_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="data_root.*images_background.zip"):
        MetaTrainer(config, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("first_order", [True, False])
def test_cuda_meta_gradient_matches_the_cpu_one(tmp_path, first_order):
    results = {}
    for device in ("cpu", "cuda"):
        config = MetaTrainConfig(meta_steps=1, first_order=first_order, device=device,
                                 run_dir=str(tmp_path / device), **FAST)
        trainer = MetaTrainer(config, progress=False)
        log = trainer.meta_step()
        grads = torch.cat([p.grad.cpu().reshape(-1) for p in trainer.meta_params])
        results[device] = log["meta_loss"], grads
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4)
    on_cuda, on_cpu = results["cuda"][1], results["cpu"][1]
    assert on_cpu.norm() > 0
    assert (on_cuda - on_cpu).norm() <= 1e-3 * on_cpu.norm()


def test_resume_finds_the_same_folder_however_it_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta_train(MetaTrainConfig(meta_steps=1, run_dir="kk", **FAST), progress=False)
    for steps, spelling in enumerate(("./kk", "kk/", str(tmp_path / "kk")), start=2):
        meta_train(MetaTrainConfig(meta_steps=steps, run_dir=spelling, **FAST), resume=True,
                   progress=False)
    (tmp_path / "kk").rename(tmp_path / "moved")
    meta_train(MetaTrainConfig(meta_steps=5, run_dir="moved", **FAST), resume=True,
               progress=False)
    assert [e["step"] for e in read_log("moved") if "meta_loss" in e] == [1, 2, 3, 4, 5]
    moved = [e for e in read_log("moved") if "resumed_with_changes" in e][-1]
    assert moved["resumed_with_changes"]["run_dir"] == {"saved": str(tmp_path / "kk"),
                                                        "given": "moved"}


def test_resume_with_a_lower_meta_lr_and_grad_clip_applies_and_logs_them(tmp_path):
    run = str(tmp_path / "run")
    meta_train(MetaTrainConfig(meta_steps=2, run_dir=run, **FAST), progress=False)
    trainer = MetaTrainer(MetaTrainConfig(meta_steps=4, run_dir=run, meta_lr=3e-4, rule_lr=3e-3,
                                          grad_clip=0.1, **FAST), resume=True, progress=False)
    # Adam's groups: the rule's weights (sinusoid default rule_lr 1e-2, now 3e-3), the init.
    assert [g["lr"] for g in trainer.adam.param_groups] == [3e-3, 3e-4]
    assert trainer.step == 2
    trainer.run()
    changes = [e for e in read_log(run) if "resumed_with_changes" in e]
    assert changes == [{"step": 2, "resumed_with_changes": {
        "meta_lr": {"saved": 1e-3, "given": 3e-4}, "rule_lr": {"saved": 1e-2, "given": 3e-3},
        "grad_clip": {"saved": 0.25, "given": 0.1}, "meta_steps": {"saved": 2, "given": 4}}}]
    # The saved state now carries the new values: resuming with them again changes nothing.
    again = MetaTrainer(MetaTrainConfig(meta_steps=4, run_dir=run, meta_lr=3e-4, rule_lr=3e-3,
                                        grad_clip=0.1, **FAST), resume=True, progress=False)
    assert again.step == 4 and [g["lr"] for g in again.adam.param_groups] == [3e-3, 3e-4]


def test_the_rule_and_the_init_take_their_own_learning_rates(tmp_path):
    """The sinusoid LSTM's rule learns at SINUSOID_RULE_LR, the init at meta_lr; elsewhere
    (and for the baselines) one learning rate, one group, as before rule_lr existed."""
    from learned_optim.config import SINUSOID_RULE_LR

    assert MetaTrainConfig().resolved().rule_lr == SINUSOID_RULE_LR == 1e-2
    assert MetaTrainConfig(method="maml").resolved().rule_lr is None
    assert MetaTrainConfig(task="omniglot", data_root="x").resolved().rule_lr is None
    trainer = MetaTrainer(MetaTrainConfig(meta_steps=1, run_dir=str(tmp_path / "lstm"), **FAST),
                          progress=False)
    rule, init = trainer.adam.param_groups
    assert (rule["lr"], init["lr"]) == (1e-2, 1e-3)
    assert len(rule["params"]) == len(list(trainer.rule.parameters())) == 5
    assert len(init["params"]) == len(list(trainer.learner.parameters())) == 6
    maml = MetaTrainer(MetaTrainConfig(method="maml", meta_steps=1,
                                       run_dir=str(tmp_path / "maml"), **FAST), progress=False)
    assert [g["lr"] for g in maml.adam.param_groups] == [1e-3]


def test_resume_refuses_to_set_or_unset_rule_lr(tmp_path):
    run = str(tmp_path / "run")
    meta_train(MetaTrainConfig(method="metasgd", meta_steps=1, run_dir=run, **FAST),
               progress=False)
    with pytest.raises(ValueError, match=r"rule_lr may change from one number to another"):
        MetaTrainer(MetaTrainConfig(method="metasgd", meta_steps=2, run_dir=run, rule_lr=2e-3,
                                    **FAST), resume=True, progress=False)


def test_resume_refuses_other_changes_naming_the_field(tmp_path):
    run = str(tmp_path / "run")
    meta_train(MetaTrainConfig(meta_steps=1, run_dir=run, **FAST), progress=False)
    with pytest.raises(ValueError, match=r"differs in \['hidden_size'\].*may change only"):
        meta_train(MetaTrainConfig(meta_steps=2, run_dir=run, hidden_size=8, **FAST),
                   resume=True, progress=False)


def test_stale_temporary_files_are_removed_on_start_and_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.state.safetensors.abc123.tmp", run / ".metrics.jsonl.x.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    keep = run / "notes.tmp"
    keep.write_text("not ours")
    meta_train(MetaTrainConfig(meta_steps=1, run_dir=str(run), **FAST), progress=False)
    assert not any(path.exists() for path in stale) and keep.exists()
    stale[0].write_bytes(b"half a write")
    meta_train(MetaTrainConfig(meta_steps=2, run_dir=str(run), **FAST), resume=True,
               progress=False)
    assert not stale[0].exists()


def test_nothing_to_resume_says_to_rerun_without_resume(tmp_path):
    config = MetaTrainConfig(meta_steps=1, run_dir=str(tmp_path / "run"), **FAST)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a run killed before its first save
    with pytest.raises(FileNotFoundError, match=r"nothing to resume.*without --resume"):
        meta_train(config, resume=True, progress=False)
    meta_train(config, progress=False)  # the advice works


def test_cli_resume_with_a_lower_meta_lr_as_the_nan_advice_says(tmp_path):
    from learned_optim import cli

    common = ["meta-train", "--no-progress", "--test-episodes", "0", "--meta-batch", "2",
              "--val-episodes", "3", "--validate-every", "10", "--checkpoint-every", "5",
              "--run-dir", str(tmp_path / "kk")]
    assert cli.main([*common, "--meta-steps", "1"]) == 0
    assert cli.main([*common, "--meta-steps", "2", "--resume", "--meta-lr", "0.0003",
                     "--grad-clip", "0.1", "--run-dir", str(tmp_path / "kk") + "/"]) == 0
    change = [e for e in read_log(tmp_path / "kk") if "resumed_with_changes" in e]
    assert change[0]["resumed_with_changes"]["meta_lr"] == {"saved": 1e-3, "given": 3e-4}


def test_cli_resume_from_the_run_folder_alone_keeps_its_saved_configuration(tmp_path):
    from learned_optim import cli

    run = str(tmp_path / "kk")
    assert cli.main(["meta-train", "--no-progress", "--test-episodes", "0", "--meta-batch", "2",
                     "--val-episodes", "3", "--validate-every", "10", "--checkpoint-every", "1",
                     "--shots", "5", "--meta-steps", "1", "--run-dir", run]) == 0
    assert cli.main(["meta-train", "--no-progress", "--test-episodes", "0", "--resume",
                     "--run-dir", run, "--meta-steps", "2"]) == 0
    assert [e["step"] for e in read_log(run) if "meta_loss" in e] == [1, 2]
    assert not [e for e in read_log(run) if "resumed_with_changes" in e
                and set(e["resumed_with_changes"]) - {"meta_steps"}]
    assert json.loads((tmp_path / "kk" / "config.json").read_text())["shots"] == 5


def test_task_distribution_trainer_resumes_under_the_same_policy(tmp_path):
    from learned_optim.truncated import TruncatedTrainer

    def config(steps, **changes):
        values = dict(task="general", meta_steps=steps, meta_batch=2, val_episodes=2,
                      horizon_max=20, truncation=10, validate_every=5, checkpoint_every=1,
                      run_dir=str(tmp_path / "g"))
        return MetaTrainConfig(**{**values, **changes})

    TruncatedTrainer(config(1), progress=False).run()
    (tmp_path / "g" / ".last.state.safetensors.x.tmp").write_bytes(b"killed mid-write")
    resumed = TruncatedTrainer(config(2, meta_lr=3e-4, run_dir=str(tmp_path / "g") + "/"),
                               resume=True, progress=False)
    assert [g["lr"] for g in resumed.adam.param_groups] == [3e-4]
    assert not (tmp_path / "g" / ".last.state.safetensors.x.tmp").exists()
    change = [e for e in read_log(tmp_path / "g") if "resumed_with_changes" in e]
    assert change[0]["resumed_with_changes"]["meta_lr"] == {"saved": 1e-3, "given": 3e-4}
    with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
        TruncatedTrainer(config(2, seed=9), resume=True, progress=False)


def test_warm_start_from_another_number_of_ways_reinitialises_only_the_head(tmp_path):
    from learned_optim import save_checkpoint
    from learned_optim.learners import ConvLearner
    from learned_optim.metalearner import MetaLearnerLSTM

    data_root = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    five_way = ConvLearner(1, 5, 8, 28)
    source = save_checkpoint(tmp_path / "5w.safetensors", MetaLearnerLSTM(),
                             learned_init=five_way)
    config = MetaTrainConfig(task="omniglot", protocol="lake-within", data_root=str(data_root),
                             ways=20, filters=8, init_from=str(source),
                             run_dir=str(tmp_path / "run"), **FAST)
    with pytest.warns(UserWarning, match=r"except \['head.bias', 'head.weight'\].*"
                                         "re-initialised"):
        trainer = MetaTrainer(config, progress=False)
    assert torch.equal(trainer.learner.features[0].weight, five_way.features[0].weight)
    assert trainer.learner.head.weight.shape == (20, 8)


def test_query_statistics_support_scores_queries_as_validation_does():
    """``query_statistics="support"``: the meta-training query loss is the loss of the model
    that ``finetune`` (validation's and test's protocol) returns; ``"batch"`` (the paper's)
    normalises the queries with their own statistics and differs."""
    import functools

    from learned_optim.data import WithinAlphabetSampler, omniglot
    from learned_optim.finetune import finetune
    from learned_optim.learners import ConvLearner
    from learned_optim.tasks import build_task

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    task = build_task(MetaTrainConfig(task="omniglot", protocol="lake-alphabets", ways=5,
                                      data_root=str(root)))
    episode = WithinAlphabetSampler(omniglot(root, "val", "lake-alphabets"), 5, 1, 5,
                                    seed=0).episode(0)
    torch.manual_seed(0)
    learner = ConvLearner(1, 5, 8, 28)
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    adapted = finetune(learner, episode.support_inputs, episode.support_targets, optimizer=sgd,
                       steps=3)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(adapted(episode.query_inputs),
                                                     episode.query_targets)
    losses = {}
    for statistics in ("support", "batch"):
        loss, _ = train_module.episode_query_loss(
            learner, sgd(learner.parameters()), {}, episode, 3, task,
            query_statistics=statistics)
        losses[statistics] = loss.item()
    assert losses["support"] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(losses["batch"] - losses["support"]) > 1e-3
    with pytest.raises(ValueError, match="query_statistics must be one of"):
        MetaTrainConfig(query_statistics="queries")


@pytest.mark.parametrize("adaptive", [False, True])
def test_adaptive_threads_run_a_meta_step_on_one_thread_while_cores_are_busy(
        tmp_path, monkeypatch, threads, adaptive):
    from learned_optim.rule import policy

    trainer = MetaTrainer(MetaTrainConfig(meta_steps=3, run_dir=str(tmp_path / "run"), **FAST),
                          progress=False, adaptive_threads=adaptive)
    seen = []
    inner = train_module.episode_query_loss
    monkeypatch.setattr(train_module, "episode_query_loss",
                        lambda *args: seen.append(torch.get_num_threads()) or inner(*args))
    monkeypatch.setattr(policy, "usable_cores", lambda: 2)
    threads(2)
    for busy in (0, 1):  # idle, then another process holding a core
        monkeypatch.setattr(policy, "busy_cores", lambda busy=busy: busy)
        trainer.meta_step()
        assert torch.get_num_threads() == 2  # restored
    assert seen == [2, 2, 1, 1] if adaptive else seen == [2, 2, 2, 2]


def test_cli_threads_takes_a_count_or_auto(tmp_path, monkeypatch, threads):
    from learned_optim import cli

    threads(2)
    assert cli._set_threads("auto", "omniglot") is True and torch.get_num_threads() == 2
    assert cli._set_threads("auto", "sinusoid") is False and torch.get_num_threads() == 1
    assert cli._set_threads(3, "omniglot") is False and torch.get_num_threads() == 3
    given = []
    monkeypatch.setattr(train_module, "meta_train",
                        lambda config, **kwargs: given.append(kwargs) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["meta-train", "--no-progress", "--run-dir", str(tmp_path / "r"), "--task",
                  "omniglot", "--data-root", str(tmp_path), "--threads", "auto"])
    assert given and given[0]["adaptive_threads"] is True
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["meta-train", "--threads", "lots"])
    assert exit_info.value.code == 2
