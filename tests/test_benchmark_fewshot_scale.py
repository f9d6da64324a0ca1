"""benchmarks/fewshot_scale.py: it fine-tunes few-shot problems of the meta-validation stream
through the rule at each update scale and writes comparable query accuracies."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fewshot_scale_benchmark_scores_trained_learners_above_untouched_ones(shared_data,
                                                                               tmp_path):
    out = tmp_path / "fewshot_scale.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fewshot_scale.py"),
                    "--scale", "1,0.0001", "--steps", "5", "--problems", "10", "--json", str(out),
                    "--data-root", str(shared_data / "omniglot")],
                   check=True, capture_output=True, text=True, timeout=600)
    doc = json.loads(out.read_text())
    assert doc["setting"]["split"] == "val" and doc["setting"]["kinds"] == ["omniglot_fewshot"]
    trained, barely = doc["summary"]["1.0"], doc["summary"]["0.0001"]
    assert len(doc["accuracy"]["1.0"]) == 10
    # a learner the rule trained for 5 steps classifies its queries far better than one it
    # barely moved (about chance: 2- to 20-way problems)
    assert trained["mean_accuracy"] > barely["mean_accuracy"] + 10, (trained, barely)
    assert barely["better_than_first"] <= 1
    # the rule's input gate after each of the 5 steps: a sigmoid, far below 1 for this rule
    # (its step is about a thirtieth of its 0.1-scaled input, Adam's direction)
    gates = trained["mean_input_gate"]
    assert len(gates) == 5 and all(0.005 < g < 0.2 for g in gates), gates
