"""examples/reproduce_rskd.py, reproduce_bild.py and reproduce_minillm.py end to end at a tiny size (about 30 s,
10–20 s and 30 s on 2 CPU cores).

RS-KD: the table must hold all six methods with finite numbers. Of the gradient angles only what the
math fixes is checked: full KD against itself is exactly 0, and RS-KD (an unbiased estimate of the
full-KD target, averaged over hundreds of positions per batch) points closer to full KD than
renormalised top-k 12 (biased: here the top 12 ids hold well under half of the teacher's mass).

BiLD: every method for every seed with scores in range, and the response-only caches smaller than
the same chats cached at every position.

MiniLLM: every method for both seeds with scores in range, the teacher's reverse KL to itself on its own
samples 0 up to the stored precision (the measurement's alignment check), and each on-policy round's
cache naming the student that answered.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--corpus-bytes", "40000", "--vocab", "300", "--seq-len", "32", "--batch-size", "8", "--eval-windows", "16",
    "--teacher-preset", "nano", "--teacher-steps", "30", "--student-preset", "nano", "--student-steps", "10",
    "--device", "cpu",
]


def load_example(monkeypatch, name: str = "reproduce_rskd"):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reproduce_rskd_at_tiny_size(tmp_path, monkeypatch):
    example = load_example(monkeypatch)
    report = example.main([*TINY, "--rskd-draws", "1", "--out", str(tmp_path / "run")])

    rows = {row["name"]: row for row in report["methods"]}
    assert list(rows) == [method.name for method in example.METHODS] and len(rows) == 6
    for row in rows.values():
        for key in ("lm_loss", "ece", "top1_agreement", "angle_init", "angle_trained"):
            assert math.isfinite(row[key]), (row["name"], key)
        assert 0.0 <= row["ece"] <= 1.0 and 0.0 <= row["angle_init"] <= 180.0

    full, rs_kd, top12 = rows["full KD (dense teacher)"], rows["RS-KD, N=50"], rows["top-k 12, renormalised"]
    for point in ("angle_init", "angle_trained"):
        assert full[point] == 0.0
        assert rs_kd[point] < top12[point], (point, rs_kd[point], top12[point])

    table = (tmp_path / "run" / "results.md").read_text()
    assert all(f"| {name} |" in table for name in rows)

    # --rskd-draws: the table's own RS-KD student first, then one more draw of its cache (another build seed).
    draws = report["rskd_draws"]
    assert [d["build_seed"] for d in draws] == [0, 1]
    assert draws[0]["lm_loss"] == rs_kd["lm_loss"] and math.isfinite(draws[1]["lm_loss"])
    assert draws[1]["lm_loss"] != draws[0]["lm_loss"]  # another draw trains another student
    assert "| RS-KD cache draw (build seed) |" in table


# ---- examples/reproduce_bild.py ---------------------------------------------------------------

BILD_TINY = [
    "--train", "100", "--held-out", "20", "--vocab", "400", "--teacher-preset", "nano", "--teacher-steps", "20",
    "--student-steps", "5", "--batch-size", "8", "--max-new-tokens", "8", "--device", "cpu",
]


def test_reproduce_bild_at_tiny_size(tmp_path, monkeypatch):
    """Every method for both seeds with finite scores, and the response-only caches smaller than caching every position."""
    example = load_example(monkeypatch, "reproduce_bild")
    report = example.main([*BILD_TINY, "--out", str(tmp_path / "run")])

    rows = {row["name"]: row for row in report["methods"]}
    assert list(rows) == [method.name for method in example.METHODS] and len(rows) == 6
    for row in rows.values():
        assert [scores["seed"] for scores in row["seeds"]] == [0, 1], row["name"]
    for scores in [report["teacher"], *(scores for row in rows.values() for scores in row["seeds"])]:
        assert 0.0 <= scores["exact_match"] <= 1.0 and 0.0 <= scores["rouge_l"] <= 1.0
        assert math.isfinite(scores["lm_loss"]) and scores["lm_loss"] > 0
    seed_0, seed_1 = (rows["SFT only"]["seeds"][i]["lm_loss"] for i in (0, 1))
    assert seed_0 != seed_1  # another seed trains another student

    storage = {row["cache"]: row for row in report["storage"]}
    assert list(storage) == list(example.CACHES)
    for row in storage.values():  # the answers are a small part of each chat, and the prompts are not cached
        assert 0 < row["response_positions"] < row["every_positions"] / 2
        assert row["response_bytes"] < row["every_bytes"]

    table = (tmp_path / "run" / "results.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "| topk-8 |" in table


# ---- examples/reproduce_minillm.py ------------------------------------------------------------

MINILLM_TINY = [
    "--train", "100", "--held-out", "10", "--vocab", "400", "--teacher-preset", "nano", "--teacher-steps", "20",
    "--sft-steps", "4", "--kd-steps", "4", "--rounds", "2", "--prompts-per-round", "8", "--fresh-samples", "1",
    "--batch-size", "4", "--max-new-tokens", "6", "--device", "cpu",
]


def test_reproduce_minillm_at_tiny_size(tmp_path, monkeypatch):
    from logitcache.cache.manifest import read_manifest
    from logitcache.teacher.folder import weights_fingerprint

    example = load_example(monkeypatch, "reproduce_minillm")
    out = tmp_path / "run"
    report = example.main([*MINILLM_TINY, "--out", str(out)])

    rows = {row["name"]: row for row in report["methods"]}
    assert list(rows) == [example.SFT_START, example.FORWARD_KD, *example.ON_POLICY]
    for row in rows.values():
        assert [scores["seed"] for scores in row["seeds"]] == [0, 1], row["name"]
    for scores in [report["teacher"], *(scores for row in rows.values() for scores in row["seeds"])]:
        assert 0.0 <= scores["exact_match"] <= 1.0 and 0.0 <= scores["rouge_l"] <= 1.0
        assert math.isfinite(scores["lm_loss"]) and math.isfinite(scores["reverse_kl"])
    # the teacher scoring its own samples: behaviour and gold log-probabilities agree to the stored precision
    assert abs(report["teacher"]["reverse_kl"]) < 1e-2
    for run in rows["on-policy rounds, minillm"]["seeds"]:
        assert run["seconds"]["generate"] > 0 and run["seconds"]["build"] > 0 and run["seconds"]["train"] > 0
    rounds = out / "seed-0" / "rounds-minillm"
    mixed = [json.loads(line) for line in (out / "seed-0" / "rounds-minillm-mixed-0.5" / "round-0" / "mixed.jsonl").read_text().splitlines()]
    assert sum(r["off_policy"] for r in mixed) == sum(not r["off_policy"] for r in mixed) > 0
    sft = out / "seed-0" / "sft" / "student"
    assert read_manifest(rounds / "round-0" / "cache")["corpus"]["generated_by"]["model_fingerprint"] == weights_fingerprint(sft)
    previous = rounds / "round-0" / "student" / "student"
    assert read_manifest(rounds / "round-1" / "cache")["corpus"]["generated_by"]["model_fingerprint"] == weights_fingerprint(previous)
    assert "| forward KD" in (out / "results.md").read_text()
