"""The run's record: ``metrics.jsonl``, one JSON object per train step and per eval, and ``loss.png``.

Train records are ``{"kind": "train", "step", "loss", "lr", "grad_norm", "tokens"}`` (``loss`` per
counted position of the global step, ``tokens`` their number); eval records are ``{"kind": "eval",
"step", ...}`` with the metrics of :func:`logitcache.train.evaluate.evaluate`. Process 0 alone writes
them, one flushed line at a time, so a killed run leaves at most a torn last line, which
:func:`read_metrics` skips; a resume first cuts the file back to its checkpoint's step
(:func:`restart_metrics`). At the end :func:`plot_losses` draws ``loss.png``, the train and eval
losses against steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from logitcache.files import write_atomic

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


@contextmanager
def metrics_log(path: Path | None, on_step: Callable[[dict], None] | None = None) -> Iterator[Callable[[dict], None]]:
    """``record(entry)``: append ``entry`` to ``path`` as one flushed JSON line and pass it to ``on_step``.

    ``path`` None (every process but 0) records nothing.
    """
    if path is None:
        yield lambda entry: None
        return
    with open(path, "a") as file:

        def record(entry: dict) -> None:
            file.write(json.dumps(entry) + "\n")
            file.flush()
            if on_step is not None:
                on_step(entry)

        yield record


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def restart_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (what a checkpoint has seen) and drop the ones after it."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def plot_losses(records: list[dict], path: Path, loss_name: str) -> None:
    """Train loss per step and eval losses per eval, as a PNG (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    train = [r for r in records if r["kind"] == "train"]
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=f"train ({loss_name})")
    evals = [r for r in records if r["kind"] == "eval"]
    for key in ("lm_loss", "kd_loss"):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axes.plot(*zip(*points), marker="o", label=f"eval {key.replace('_', ' ')}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def final_metrics(records: list[dict], student: Path) -> dict:
    """The last train record's step and loss and the last eval's metrics (``eval_*``)."""
    last_train = next((r for r in reversed(records) if r["kind"] == "train"), {})
    last_eval = next((r for r in reversed(records) if r["kind"] == "eval"), {})
    metrics = {"step": last_train.get("step", 0), "loss": last_train.get("loss")}
    metrics.update({f"eval_{k}": v for k, v in last_eval.items() if k not in ("kind", "step")})
    return {**metrics, "student": str(student)}
