"""Write ``docs/results.md`` and its figures from the shipped checkpoints' records.

    python benchmarks/results_page.py --data-root ../shared/data/omniglot

Tables come from each checkpoint's model card (its measured test results); the figures are the
validation curves recorded during meta-training and the gates i_t and f_t of the learned rule
over the inner steps (the paper's Figure 2 analysis), measured here on test episodes. The
transfer and horizon studies (``benchmarks/transfer.py``, ``benchmarks/horizon.py``) are
included from ``docs/results/`` when present. The page's prose, with the figures it discusses,
is ``docs/results/notes/results_page.md``: edit it there when the measurements change.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from learned_optim import available_pretrained, finetune, load_checkpoint
from learned_optim.config import MetaTrainConfig
from learned_optim.data.omniglot import WITHIN_ALPHABET_PROTOCOLS
from learned_optim.data.sinusoid import PROTOCOLS as SINUSOID_PROTOCOLS
from learned_optim.evaluate import evaluate
from learned_optim.packaging.episodic import result_notes
from learned_optim.plots import plot_gates, pyplot, record_gates
from learned_optim.tasks import build_task

DOCS = Path(__file__).resolve().parents[1] / "docs"
STATIC = DOCS / "_static"
# The page's text: prose and measured figures, with {placeholders} for the generated parts.
NOTES = DOCS / "results" / "notes" / "results_page.md"

# (target of the issue, published figures to compare with) per shipped checkpoint
PUBLISHED = {
    "omniglot-5w1s": ("accuracy >= 98.7%", "MAML 98.7, ProtoNets 98.8, Meta-SGD 99.53"),
    "omniglot-5w5s": ("accuracy >= 99.5%", "MAML 99.9, ProtoNets 99.7, Meta-SGD 99.93"),
    "omniglot-20w1s": ("accuracy >= 95.8%", "MAML 95.8, ProtoNets 96.0, Meta-SGD 95.93"),
    "omniglot-20w5s": ("accuracy >= 98.9%", "MAML 98.9, ProtoNets 98.9, Meta-SGD 98.97"),
    "omniglot-lake-20w1s": ("accuracy >= 92.0%", "Lake et al. 2015, 20-way within-alphabet "
                            "one-shot error: Siamese 8.0, ConvNet 13.5, humans 4.5, BPL 3.3"),
    "omniglot-lake-5w1s": ("", "Lake et al. publish 20-way only; no target"),
    "omniglot-lake-alphabets-20w1s": ("accuracy >= 92.0%", "the same test as "
                                      "omniglot-lake-20w1s and the same published figures"),
    "omniglot-lake-alphabets-resnet12-20w1s": ("accuracy >= 92.0%", "the same test as "
                                               "omniglot-lake-20w1s and the same published "
                                               "figures"),
    "sinusoid-10shot": ("MSE <= 0.53", "Meta-SGD 0.53, MAML 0.77 (Meta-SGD's sinusoids, "
                                       "1 step; ours T = 5)"),
    "sinusoid-10shot-maml": ("", "MAML publishes K = 5 only (0.35 after 10 steps); no target"),
}
# The sinusoid family on which each published figure was measured: the target is judged there.
PEER_PROTOCOL = {"sinusoid-10shot": "metasgd"}


def other_family_results(records: dict[str, dict], episodes: int = 600) -> dict[str, dict]:
    """Each sinusoid checkpoint evaluated on the families it was not trained on, by protocol."""
    found = {}
    for name, record in records.items():
        config = record["config"]
        if config["task"] == "sinusoid":
            found[name] = {}
            for protocol in SINUSOID_PROTOCOLS:
                if protocol != config["protocol"]:
                    report = evaluate(name, protocol=protocol, episodes=episodes)
                    found[name][protocol] = next(iter(report.results.values())).as_dict()
    return found


def results_table(records: dict[str, dict]) -> str:
    lines = ["| checkpoint | method | score | 95% CI | episodes | notes |",
             "|---|---|---|---|---|---|"]
    for name, record in records.items():
        test = record["card"]["test"]
        accuracy = test["metric"] == "accuracy"
        for method, r in test["results"].items():
            score = f"{r['mean'] * 100:.2f}%" if accuracy else f"{r['mean']:.3f}"
            ci = f"{r['ci95'] * 100:.2f}" if accuracy else f"{r['ci95']:.3f}"
            notes = result_notes(r, test["metric"])
            lines.append(f"| `{name}` | {method} | {score} | {ci} | {r['episodes']} | {notes} |")
    return "\n".join(lines)


def _judged(result: dict, accuracy: bool, bound: float | None) -> tuple[str, bool]:
    """A test result as the targets table shows it, and whether it meets the bound."""
    value = result["mean"] * (100 if accuracy else 1)
    shown = (f"{value:.2f}% +- {result['ci95'] * 100:.2f}" if accuracy
             else f"{value:.3f} +- {result['ci95']:.3f}")
    met = bound is not None and (value >= bound if accuracy else value <= bound)
    return shown, met


def targets_table(records: dict[str, dict], elsewhere: dict[str, dict]) -> str:
    """Each checkpoint's test result against its target, judged on the published figure's
    family; ``elsewhere`` holds results on other families (:func:`other_family_results`)."""
    lines = ["| checkpoint | ours (test, 95% CI) | target | published | reached |",
             "|---|---|---|---|---|"]
    for name, record in records.items():
        target, published = PUBLISHED.get(name, ("", ""))
        accuracy = record["card"]["test"]["metric"] == "accuracy"
        bound = float(target.split()[-1].rstrip("%")) if target else None
        own = record["config"].get("protocol")
        by_family = {own: next(iter(record["card"]["test"]["results"].values())),
                     **elsewhere.get(name, {})}
        judged_on = PEER_PROTOCOL.get(name, own)
        shown, met = _judged(by_family[judged_on], accuracy, bound)
        if len(by_family) > 1:
            shown = "; ".join(f"{_judged(result, accuracy, bound)[0]} on the {family} family"
                              f"{' (trained on)' if family == own else ''}"
                              for family, result in by_family.items())
        reached = "" if bound is None else ("yes" if met else "no")
        if len(by_family) > 1 and bound is not None:
            reached += f" (on the {judged_on} family, where the figure was measured)"
        lines.append(f"| `{name}` | {shown} | {target} | {published} | {reached} |")
    return "\n".join(lines)


def episodes_note(records: dict[str, dict]) -> str:
    """Which checkpoints were evaluated on fewer than the standard 600 test episodes."""
    short = []
    for name, record in records.items():
        results = record["card"]["test"]["results"]
        counts = sorted({r["episodes"] for r in results.values()})
        if counts != [600]:
            short.append(f"`{name}` on {'/'.join(map(str, counts))}")
    if not short:
        return "Every checkpoint was evaluated on 600 test episodes."
    return ("Evaluated on fewer than 600 test episodes, for lack of CPU time: "
            + ", ".join(short) + ".")


def peers_note(records: dict[str, dict]) -> str:
    """Ours against the MAML / Meta-SGD rows of every card that has them, with meta-steps."""
    parts = []
    for name, record in records.items():
        test = record["card"]["test"]
        accuracy = test["metric"] == "accuracy"
        results = test["results"]
        peers = [(label, results[key]) for key, label in (("maml", "MAML"),
                                                           ("metasgd", "Meta-SGD"))
                 if key in results]
        if peers:
            ours = next(iter(results.values()))
            parts.append(
                f"`{name}`: ours {_with_steps(ours, accuracy, record['card'].get('meta_steps'))}, "
                + ", ".join(f"{label} {_with_steps(r, accuracy, _trained_steps(r))}"
                            for label, r in peers))
    return "; ".join(parts) + "." if parts else ""


def _with_steps(result: dict, accuracy: bool, steps: int | None) -> str:
    """A test result as the peers note shows it, with the meta-steps behind it when known."""
    score = (f"{result['mean'] * 100:.2f} +- {result['ci95'] * 100:.2f}%" if accuracy
             else f"{result['mean']:.2f} +- {result['ci95']:.2f}")
    return f"{score} ({steps} meta-steps)" if steps else score


def _trained_steps(row: dict) -> int | None:
    """The meta-steps a baseline's training note names (``packaging.episodic`` writes it)."""
    found = re.search(r"(\d+) meta-steps", row.get("trained", ""))
    return int(found.group(1)) if found else None


# Lake et al. (Science 2015), 20-way within-alphabet one-shot classification, error (%).
LAKE_PUBLISHED = (("people", 4.5), ("Bayesian Program Learning", 3.3),
                  ("Siamese convnet (Koch et al.)", 8.0), ("convnet", 13.5))


def lake_section(records: dict[str, dict]) -> str:
    """Error rates of the checkpoints tested with Lake's protocol, beside the published ones."""
    lake = {name: r for name, r in records.items()
            if r["config"].get("protocol") in WITHIN_ALPHABET_PROTOCOLS}
    if not lake:
        return ""
    lines = ["| checkpoint | method | error (%) | 95% CI | episodes | notes |",
             "|---|---|---|---|---|---|"]
    for name, record in lake.items():
        for method, r in record["card"]["test"]["results"].items():
            notes = result_notes(r, "accuracy")
            lines.append(f"| `{name}` | {method} | {100 * (1 - r['mean']):.2f} | "
                         f"{100 * r['ci95']:.2f} | {r['episodes']} | {notes} |")
    lines += ensemble_rows()
    for method, error in LAKE_PUBLISHED:
        lines.append(f"| Lake et al. 2015 (20-way) | {method} | {error} | | 20 runs x 20 | "
                     "published |")
    training = "; ".join(
        f"`{name}` {r['card']['meta_steps']} meta-steps in {r['card']['train_wall_time_s']} s "
        f"on {r['card']['hardware']}" for name, r in lake.items())
    overlap = DOCS / "results" / "lake_overlap.md"
    return f"""## Lake et al.'s within-alphabet one-shot protocol

`omniglot-lake-5w1s` and `omniglot-lake-20w1s` were meta-trained on the 30 background alphabets
only (the `lake-within` protocol: episodes inside one alphabet, support and query written by
different drawers; a tenth of the background characters validates) and tested on 600 such
episodes of the 20 evaluation alphabets, which they never saw (`learned-optim evaluate NAME
--baselines sgd,nn`; 15 query drawers per class, each query classified alone, so the error is
Lake's one-query error averaged over more drawers). SGD fine-tunes the same learned init with a
learning rate tuned on validation episodes; `nn` is nearest neighbour in the init's features.
Checkpoints of the `lake-alphabets` protocol have the same test split and test episodes but
were validated inside five whole held-out background alphabets (20-way episodes, as the test),
not on mixed-alphabet episodes of held-out characters.
Training: {training}.

{chr(10).join(lines)}

{overlap.read_text() if overlap.exists() else ""}"""


def ensemble_rows() -> list[str]:
    """Rows of the ensembles evaluated on Lake's test (``docs/results/lake_ensemble*.json``,
    written by ``learned-optim evaluate A --ensemble B ... --json``)."""
    lines = []
    for path in sorted((DOCS / "results").glob("lake_ensemble*.json")):
        report = json.loads(path.read_text())
        members = " + ".join(f"`{Path(m).stem}`" for m in report["setting"]["ensemble"])
        for method, r in report["results"].items():
            notes = result_notes({k: v for k, v in r.items() if k not in ("members", "init")},
                                 "accuracy")
            lines.append(f"| {members} | {method} | {100 * (1 - r['mean']):.2f} | "
                         f"{100 * r['ci95']:.2f} | {r['episodes']} | {notes} |")
    return lines


def training_minutes(records: dict[str, dict]) -> str:
    """The range of meta-training wall times of the GPU-trained Omniglot cards, in minutes."""
    minutes = sorted(round(r["card"]["train_wall_time_s"] / 60) for name, r in records.items()
                     if name.startswith("omniglot") and not name.startswith("omniglot-lake"))
    if not minutes:
        return "no"
    return (f"about {minutes[0]}" if minutes[0] == minutes[-1]
            else f"{minutes[0]} to {minutes[-1]}")


def peers_with_baselines(records: dict[str, dict]) -> str:
    names = [f"`{name}`" for name, record in records.items()
             if {"maml", "metasgd"} & set(record["card"]["test"]["results"])]
    return ", ".join(names) if names else "none"


def cost_table() -> str:
    """First- against second-order meta-training, from ``benchmarks/meta_train.py`` runs."""
    lines = ["| episode | device | first / second order: episodes/s | saved-tensor memory | "
             "peak memory growth | ceilings (free update rule) | per-episode overhead | "
             "report |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted((DOCS / "results").glob("meta_train*.json")):
        run = json.loads(path.read_text())
        if "speedup" not in run:  # meta_train_reference*.json: package against the reference
            continue
        setting = run["setting"]
        device = setting.get("device", "cpu")
        peak = "n/a" if run.get("rss_ratio") is None else f"{run['rss_ratio']:.2f}"
        lines.append(
            f"| Omniglot {setting['ways']}-way {setting['shots']}-shot, T = "
            f"{setting['inner_steps']}, {setting['filters']} filters | "
            f"{setting.get('device_name', device)} | {run['speedup']:.2f}x | "
            f"{run['saved_memory_ratio']:.2f} | {peak} | {run['speed_ceiling']:.2f}x, "
            f"{run['memory_floor']:.2f} | {run['overhead']:.2f}x | "
            f"[{path.stem}](results/{path.stem}.md) |")
    return "\n".join(lines)


def plot_curves(records: dict[str, dict], out_png: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, record in records.items():
        card = record["card"]
        key = "val_accuracy" if card["test"]["metric"] == "accuracy" else "val_mse"
        trace = [e for e in card["validation_trace"] if key in e]
        axis = axes[0] if key == "val_accuracy" else axes[1]
        axis.errorbar([e["step"] for e in trace], [e[key] for e in trace],
                      yerr=[e[key + "_ci95"] for e in trace], marker="o", markersize=3,
                      capsize=2, label=name)
    axes[0].set(title="Omniglot: validation accuracy", xlabel="meta-step", ylabel="accuracy")
    axes[1].set(title="Sinusoid: validation MSE", xlabel="meta-step", ylabel="MSE")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png


def gate_records(name: str, data_root: str, episodes: int, steps: int | None = None) -> list:
    """Gates per layer after each inner step, on test episodes, with the learned init."""
    checkpoint = load_checkpoint(name)
    config = MetaTrainConfig.from_dict({**checkpoint.record["config"],
                                        "data_root": data_root}).resolved()
    task = build_task(config)
    source = task.episodes("test")
    records = []
    for index in range(episodes):
        episode = source.episode(index)
        finetune(task.make_learner(), episode.support_inputs, episode.support_targets,
                 optimizer=checkpoint.meta_learner, steps=steps or config.inner_steps,
                 loss_fn=task.loss, learned_init=checkpoint, adapt=config.adapt,
                 on_step=lambda step, index=index: records.extend(record_gates(
                     step.optimizer, step=step.step, episode=index, model=step.model)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="Omniglot folder (for the gates)")
    parser.add_argument("--gate-episodes", type=int, default=20)
    parser.add_argument("--keep-gate-figures", action="store_true",
                        help="keep docs/_static/gates_*.png as they are (the gates of shipped "
                             "checkpoints do not change when others are added)")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = available_pretrained()
    STATIC.mkdir(parents=True, exist_ok=True)
    records = {name: load_checkpoint(name).record for name in names}  # each file read once
    # The general rule has no episodes of its own: docs/general-rule.md and its own pages.
    records = {name: r for name, r in records.items() if r["config"].get("task") != "general"}
    names = list(records)
    plot_curves(records, STATIC / "results_curves.png")
    for name, label in (("omniglot-5w1s", "1-shot"), ("omniglot-5w5s", "5-shot")):
        if name in names and not args.keep_gate_figures:
            plot_gates(gate_records(name, args.data_root, args.gate_episodes),
                       STATIC / f"gates_{name}.png",
                       title=f"{name}: gates over the inner steps ({label}, "
                             f"{args.gate_episodes} test episodes)")
    studies = "\n\n".join((DOCS / "results" / f"{study}.md").read_text()
                          for study in ("transfer", "horizon")
                          if (DOCS / "results" / f"{study}.md").exists())
    # The page's prose, with the figures it discusses, lives in a notes file beside the JSONs
    # it was written from; only the tables and lists below are generated here.
    page = NOTES.read_text().format(
        peers_with_baselines=peers_with_baselines(records), episodes_note=episodes_note(records),
        targets_table=targets_table(records, other_family_results(records)),
        training_minutes=training_minutes(records), peers_note=peers_note(records),
        results_table=results_table(records), lake_section=lake_section(records),
        cost_table=cost_table(), studies=studies)
    (DOCS / "results.md").write_text(page)
    print(f"wrote {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
