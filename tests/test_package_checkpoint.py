"""Packaging episodic checkpoints (``learned_optim.packaging.episodic``): baselines join a
shipped card with ``--add-results``, nothing else changes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from learned_optim.checkpoint import PRETRAINED_DIR, load_checkpoint
from learned_optim.packaging import episodic as package_checkpoint

NAME = "omniglot-5w1s"


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    """A copy of a shipped checkpoint and card in a scratch pretrained folder."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    for suffix in (".safetensors", ".md"):
        shutil.copy(PRETRAINED_DIR / f"{NAME}{suffix}", folder)
    monkeypatch.setattr(package_checkpoint, "PRETRAINED_DIR", folder)
    return folder


def _baseline_run(folder: Path) -> Path:
    """A finished MAML run folder: its config and metrics log."""
    folder.mkdir()
    config = {"first_order": True, "inner_steps": 5, "meta_batch": 8, "inner_lr": 0.4}
    (folder / "config.json").write_text(json.dumps(config))
    lines = [{"step": s, "meta_loss": 1.0, "elapsed_s": 2.5 * s} for s in (1, 2, 40)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def _shipped_test() -> dict:
    """The shipped card's test, its setting as evaluations write it (protocol included)."""
    record = load_checkpoint(PRETRAINED_DIR / f"{NAME}.safetensors").record
    return {**record["card"]["test"], "setting": package_checkpoint.card_setting(record)}


def _evaluation(tmp_path: Path, lstm_mean_shift: float = 0.0) -> Path:
    test = _shipped_test()
    lstm = dict(test["results"]["meta-learner LSTM"])
    lstm["mean"] += lstm_mean_shift
    results = {"meta-learner LSTM": lstm,
               "maml": {"mean": 0.9, "ci95": 0.01, "episodes": lstm["episodes"],
                        "init": "learned init"}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**test, "results": results}))
    return path


def test_baseline_rows_are_added_and_the_tensors_kept(shipped, tmp_path):
    run = _baseline_run(tmp_path / "maml-run")
    path = package_checkpoint.add_results(NAME, _evaluation(tmp_path), {"maml": run}, "a CPU")
    before = load_checkpoint(PRETRAINED_DIR / f"{NAME}.safetensors")
    after = load_checkpoint(path)
    row = after.record["card"]["test"]["results"]["maml"]
    assert row["mean"] == 0.9
    assert row["trained"] == ("same routine and config as the LSTM (first order, T = 5, "
                              "meta-batch 8, 40 meta-steps), inner lr 0.4, 100 s on a CPU")
    assert after.record["metrics"] == before.record["metrics"]
    for key, tensor in before.meta_learner.state_dict().items():
        assert torch.equal(tensor, after.meta_learner.state_dict()[key])
    assert "| maml | 90.00 | 1.00 |" in (shipped / f"{NAME}.md").read_text()


def test_a_baseline_stopped_early_or_with_another_meta_lr_says_so(tmp_path):
    run = _baseline_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "meta_lr": 1e-4, "meta_steps": 100}))
    note = package_checkpoint.baseline_training_note(run, "a CPU", "best of step 30")
    assert note == ("same routine and config as the LSTM (first order, T = 5, meta-batch 8, "
                    "40 meta-steps, meta-lr 0.0001), inner lr 0.4, 100 s on a CPU; stopped at "
                    "meta-step 40 of 100; best of step 30")


def test_an_evaluation_on_other_episodes_is_refused(shipped, tmp_path):
    with pytest.raises(SystemExit, match="not evaluated on the card's episodes"):
        package_checkpoint.add_results(NAME, _evaluation(tmp_path, lstm_mean_shift=0.01), {},
                                       "a CPU")
    untouched = (shipped / f"{NAME}.safetensors").read_bytes()
    assert untouched == (PRETRAINED_DIR / f"{NAME}.safetensors").read_bytes()


def _continued_run(folder: Path, init_from: str) -> Path:
    """A finished LSTM run warm-started from ``init_from``, its best checkpoint the shipped one."""
    folder.mkdir()
    shipped = load_checkpoint(PRETRAINED_DIR / f"{NAME}.safetensors").record["config"]
    (folder / "config.json").write_text(json.dumps({**shipped, "init_from": init_from}))
    lines = [{"step": 0, "val_accuracy": 0.9, "val_accuracy_ci95": 0.01, "val_episodes": 100},
             {"step": 30, "meta_loss": 0.2, "elapsed_s": 60.0},
             {"step": 30, "val_accuracy": 0.95, "val_accuracy_ci95": 0.01, "val_episodes": 100}]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    shutil.copy(PRETRAINED_DIR / f"{NAME}.safetensors", folder / "best.safetensors")
    return folder


def _new_evaluation(tmp_path: Path, checkpoint: Path, **setting_changes) -> Path:
    """An evaluation of ``checkpoint`` with the LSTM and SGD rows only (no MAML, Meta-SGD)."""
    test = _shipped_test()
    results = {"meta-learner LSTM": {"mean": 0.95, "ci95": 0.005, "episodes": 600},
               "sgd": {"mean": 0.93, "ci95": 0.005, "episodes": 600, "lr": 0.03}}
    path = tmp_path / "new-eval.json"
    setting = {**test["setting"], "checkpoint": str(checkpoint), **setting_changes}
    path.write_text(json.dumps({**test, "setting": setting, "results": results}))
    return path


def test_a_continued_run_counts_the_shipped_training_and_keeps_its_peers(shipped, tmp_path):
    before = load_checkpoint(PRETRAINED_DIR / f"{NAME}.safetensors").record["card"]
    run = _continued_run(tmp_path / "run", f"learned_optim/pretrained/{NAME}.safetensors")
    evaluation = _new_evaluation(tmp_path, run / "best.safetensors")
    path = package_checkpoint.package(NAME, [run], evaluation, "a GPU", "meta-train again",
                                      continues=True)
    card = load_checkpoint(path).record["card"]
    assert card["meta_steps"] == before["meta_steps"] + 30
    assert card["episodes_trained"] == before["episodes_trained"] + 30 * 8
    assert card["train_wall_time_s"] == before["train_wall_time_s"] + 60
    assert card["validation_trace"][-1]["step"] == before["meta_steps"] + 30
    assert card["hardware"] == f"{before['hardware']}, then a GPU"
    results = card["test"]["results"]
    assert results["meta-learner LSTM"]["mean"] == 0.95 and results["sgd"]["mean"] == 0.93
    # MAML and Meta-SGD were trained apart, on the same episodes: their rows stay.
    assert results["maml"] == before["test"]["results"]["maml"]
    assert list(results)[0] == "meta-learner LSTM"


def test_a_run_continued_on_another_split_drops_the_shipped_peers(shipped, tmp_path):
    # The shipped MAML row was measured on the vinyals split (an old card: the protocol comes
    # from its configuration), so it cannot stand beside a test on Lake's split.
    assert "protocol" not in load_checkpoint(NAME).record["card"]["test"]["setting"]
    run = _continued_run(tmp_path / "run", f"learned_optim/pretrained/{NAME}.safetensors")
    evaluation = _new_evaluation(tmp_path, run / "best.safetensors", protocol="lake")
    path = package_checkpoint.package(NAME, [run], evaluation, "a GPU", "meta-train again",
                                      continues=True)
    assert list(load_checkpoint(path).record["card"]["test"]["results"]) == [
        "meta-learner LSTM", "sgd"]


def test_baselines_from_another_split_are_refused(shipped, tmp_path):
    path = _evaluation(tmp_path)
    evaluation = json.loads(path.read_text())
    evaluation["setting"]["protocol"] = "lake"
    path.write_text(json.dumps(evaluation))
    with pytest.raises(SystemExit, match="not evaluated on the card's episodes"):
        package_checkpoint.add_results(NAME, path, {}, "a CPU")


def test_packaging_refuses_a_mismatched_run_or_evaluation(shipped, tmp_path):
    foreign = _continued_run(tmp_path / "foreign", "runs/other/best.safetensors")
    with pytest.raises(SystemExit, match="--continues needs a first run started with"):
        package_checkpoint.package(NAME, [foreign], _new_evaluation(
            tmp_path, foreign / "best.safetensors"), "a GPU", "x", continues=True)
    run = _continued_run(tmp_path / "run", f"learned_optim/pretrained/{NAME}.safetensors")
    with pytest.raises(SystemExit, match="not the best checkpoint of"):
        package_checkpoint.package(NAME, [run], _new_evaluation(tmp_path, foreign), "a GPU", "x")
    assert (shipped / f"{NAME}.safetensors").read_bytes() == (
        PRETRAINED_DIR / f"{NAME}.safetensors").read_bytes()


def test_cards_take_summaries_not_per_episode_scores(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"results": {"meta-learner LSTM": {
        "mean": 0.8, "ci95": 0.01, "episodes": 3, "scores": [0.7, 0.8, 0.9]}}}))
    row = package_checkpoint.read_evaluation(path)["results"]["meta-learner LSTM"]
    assert row == {"mean": 0.8, "ci95": 0.01, "episodes": 3}


def test_a_run_after_another_shipped_checkpoint_counts_that_training_first(shipped, tmp_path):
    first = load_checkpoint(PRETRAINED_DIR / "omniglot-5w5s.safetensors").record["card"]
    shutil.copy(PRETRAINED_DIR / "omniglot-5w5s.safetensors", shipped)
    run = _continued_run(tmp_path / "run", "runs/other-5w5s/best.safetensors")
    evaluation = _new_evaluation(tmp_path, run / "best.safetensors")
    path = package_checkpoint.package(NAME, [run], evaluation, "a CPU", "meta-train 1-shot",
                                      after="omniglot-5w5s")
    card = load_checkpoint(path).record["card"]
    assert card["meta_steps"] == first["meta_steps"] + 30
    assert card["train_wall_time_s"] == first["train_wall_time_s"] + 60
    assert card["validation_trace"][:len(first["validation_trace"])] == first["validation_trace"]
    assert card["command"] == f"{first['command']}; then meta-train 1-shot"
    assert card["hardware"] == f"{first['hardware']}, then a CPU"
    # Nothing of the other checkpoint's results: only this evaluation's rows.
    assert list(card["test"]["results"]) == ["meta-learner LSTM", "sgd"]
    # What the warm start saw is counted as seen (the same split here, so the same characters).
    data = load_checkpoint(path).record["training_data"]
    assert data["warm_started_from"] == ["omniglot-5w5s"]
    assert "with what its warm start `omniglot-5w5s` saw" in (shipped / f"{NAME}.md").read_text()
    cold = _continued_run(tmp_path / "cold", "")
    with pytest.raises(SystemExit, match="needs a first run warm-started"):
        package_checkpoint.package(NAME, [cold], _new_evaluation(
            tmp_path, cold / "best.safetensors"), "a CPU", "x", after="omniglot-5w5s")


def test_a_card_says_when_the_learned_init_was_pretrained_in_an_earlier_run(shipped, tmp_path):
    shipped_path = f"learned_optim/pretrained/{NAME}.safetensors"
    first = _continued_run(tmp_path / "pretrained-run", shipped_path)
    config = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps({**config, "pretrain_epochs": 8}))
    second = _continued_run(tmp_path / "next-run", str(first / "best.safetensors"))
    evaluation = _new_evaluation(tmp_path, second / "best.safetensors")
    path = package_checkpoint.package(NAME, [first, second], evaluation, "a CPU", "meta-train",
                                      continues=True)
    assert load_checkpoint(path).record["card"]["pretrain_epochs"] == 8
    text = (shipped / f"{NAME}.md").read_text()
    assert ("features pre-trained first as one classifier of all training classes (8 epochs"
            in text)
    # without pre-training the card says nothing of it
    plain = _continued_run(tmp_path / "plain-run", shipped_path)
    path = package_checkpoint.package(NAME, [plain],
                                      _new_evaluation(tmp_path, plain / "best.safetensors"),
                                      "a CPU", "meta-train", continues=True)
    assert "pretrain_epochs" not in load_checkpoint(path).record["card"]
    assert "pre-trained first" not in (shipped / f"{NAME}.md").read_text()


def test_a_card_says_which_alphabets_pretrained_the_features(shipped, tmp_path):
    shipped_path = f"learned_optim/pretrained/{NAME}.safetensors"
    first = _continued_run(tmp_path / "pretrained-run", shipped_path)
    config = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps(
        {**config, "pretrain_epochs": 12, "pretrain_alphabets": 17}))
    evaluation = _new_evaluation(tmp_path, first / "best.safetensors")
    path = package_checkpoint.package(NAME, [first], evaluation, "a CPU", "meta-train",
                                      continues=True)
    assert load_checkpoint(path).record["card"]["pretrain_alphabets"] == 17
    assert ("one classifier of the training classes of 17 training alphabets, meta-training's "
            "episodes drawn from the other alphabets (12 epochs"
            in (shipped / f"{NAME}.md").read_text())


def test_a_card_says_when_the_features_were_pretrained_as_a_prototypical_network(shipped,
                                                                                 tmp_path):
    shipped_path = f"learned_optim/pretrained/{NAME}.safetensors"
    first = _continued_run(tmp_path / "pretrained-run", shipped_path)
    config = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps(
        {**config, "pretrain_episodes": 4000, "pretrain_distort": True}))
    evaluation = _new_evaluation(tmp_path, first / "best.safetensors")
    path = package_checkpoint.package(NAME, [first], evaluation, "a CPU", "meta-train",
                                      continues=True)
    card = load_checkpoint(path).record["card"]
    assert card["pretrain_episodes"] == 4000 and "pretrain_epochs" not in card
    assert ("features pre-trained first as a prototypical network on all training classes "
            "(4000 episodes, randomly distorted images" in (shipped / f"{NAME}.md").read_text())
