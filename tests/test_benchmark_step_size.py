"""benchmarks/step_size.py: it trains long problems of the meta-validation stream through the
rule at each step-size multiplier and writes comparable scores."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_size_benchmark_scores_trained_problems_below_untrained_ones(shared_data, tmp_path):
    out = tmp_path / "step_size.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_size.py"), "--lr", "1.0,0",
                    "--horizon", "300", "--problems", "1", "--json", str(out),
                    "--data-root", str(shared_data / "omniglot")],
                   check=True, capture_output=True, text=True, timeout=600)
    doc = json.loads(out.read_text())
    trained, untouched = doc["scores"]["1.0"][0], doc["scores"]["0.0"][0]
    assert doc["setting"]["split"] == "val" and len(doc["setting"]["problems"]) == 1
    assert math.isfinite(trained) and math.isfinite(untouched)
    # lr 0 leaves the fresh learner as it was: its held-out loss is far above the trained one's
    assert trained < untouched - 0.3, (trained, untouched)
