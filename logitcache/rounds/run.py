"""Run (or continue) on-policy rounds: each round generates with its student, scores the answers with
the teacher once, and trains the student from its own weights on that cache.

Round ``r`` (from 0) starts from the round-0 ``--student`` when ``r == 0``, else from round ``r - 1``'s
trained student, and writes ``OUT/round-r/``:

- ``prompts.jsonl``: the round's prompts (the next ``--prompts-per-round`` of a permutation of
  ``--prompts`` seeded by ``--seed``, wrapping), each record's reference answer left out, with
  ``index``, its position in ``--prompts``;
- ``generated.jsonl`` (and ``generated.jsonl.settings.json``): ``logitcache generate``'s output;
- with ``--off-policy-fraction f``: ``mixed.jsonl``, the generated records followed by off-policy records
  of ``--off-policy-data`` with their reference answers, ``n f / (1 - f)`` of them (rounded half up) for ``n``
  generated records (a permutation seeded by ``(seed, r)``, wrapping), so that they are a fraction ``f``
  of the round's examples. Every record there has ``off_policy`` (false for the generated, which keep
  generate's fields; true for the others, whose ``index`` is their position in ``--off-policy-data``);
  the cache's examples are in this order. Beside it, a copy of the generation's settings file, so that
  the build names the student that answered (``corpus.generated_by``), as it does for generate's output;
- ``cache/``: the teacher's build (``--format`` of the prompts) of the generated or mixed records;
- ``student/``: ``logitcache train``'s output folder; ``student/student/`` is the round's trained student;
- ``stages.json``: each finished stage's wall time (and the evaluation's scores);
- ``metrics.json``: the round's record (:func:`round_metrics`), written last: the round is done.

``OUT/rounds.json`` keeps the settings (a rerun with others is refused, but for
:data:`~.settings.RESUMABLE_CHANGES`) and ``OUT/rounds.jsonl`` every finished round's metrics.

A rerun continues where a run stopped: a finished stage is skipped (generate: its entry in
``stages.json``; build: the cache's manifest; train: the trained student), an unfinished one resumes
with the stage's own resume. A stage resumed after a crash counts only the time of the run that
finished it. Generation, build and training are deterministic, so a resumed run ends with the
student an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitcache.build.run import run_build
from logitcache.cache.layout import MANIFEST_NAME
from logitcache.cache.manifest import read_manifest
from logitcache.errors import LogitcacheError
from logitcache.files import write_atomic, write_json_atomic
from logitcache.generate.run import read_prompts, run_generate
from logitcache.generate.settings import settings_path
from logitcache.generate.tasks import run_evaluate
from logitcache.rounds.settings import RESUMABLE_CHANGES, RoundsSettings
from logitcache.train.checkpoint import STUDENT_NAME, find_checkpoint
from logitcache.train.loop import run_train
from logitcache.train.metrics import METRICS_NAME, final_metrics, read_metrics

log = logging.getLogger(__name__)

SETTINGS_NAME = "rounds.json"
ROUNDS_LOG_NAME = "rounds.jsonl"
TIMED_STAGES = ("generate", "mix", "build", "train", "evaluate")

# stage_progress(description) -> a context giving advance(n=0, completed=..., total=..., description=...)
StageProgress = Callable[[str], AbstractContextManager[Callable[..., None]]]


@dataclass(frozen=True)
class RoundFolder:
    """``OUT/round-R/`` and the names of its files (module docstring)."""

    path: Path

    @classmethod
    def of(cls, out: Path, round_index: int) -> RoundFolder:
        return cls(Path(out) / f"round-{round_index}")

    prompts = property(lambda self: self.path / "prompts.jsonl")
    generated = property(lambda self: self.path / "generated.jsonl")
    mixed = property(lambda self: self.path / "mixed.jsonl")
    cache = property(lambda self: self.path / "cache")
    train = property(lambda self: self.path / "student")  # train's --out
    student = property(lambda self: self.train / STUDENT_NAME)  # the round's trained student
    stages = property(lambda self: self.path / "stages.json")
    metrics = property(lambda self: self.path / "metrics.json")


def round_student(settings: RoundsSettings, round_index: int) -> Path:
    """The student round ``round_index`` starts from (generates with and trains from)."""
    if round_index == 0:
        return Path(settings.student)
    return RoundFolder.of(settings.out, round_index - 1).student


def round_prompt_order(n_prompts: int, per_round: int | None, seed: int, round_index: int) -> list[int]:
    """Positions in the prompts of round ``round_index``'s prompts: the next ``per_round`` (all when None)
    of a permutation of ``range(n_prompts)`` seeded by ``seed``, wrapping around."""
    per_round = per_round or n_prompts
    order = np.random.default_rng(seed).permutation(n_prompts)
    return order[(round_index * per_round + np.arange(per_round)) % n_prompts].tolist()


def off_policy_count(generated: int, fraction: float) -> int:
    """Off-policy records to add to ``generated`` records so that they make ``fraction`` of all (rounded half up)."""
    return math.floor(generated * fraction / (1 - fraction) + 0.5)


def off_policy_order(n_records: int, count: int, seed: int, round_index: int) -> list[int]:
    """Positions of round ``round_index``'s ``count`` off-policy records: a permutation of
    ``range(n_records)`` seeded by ``(seed, round_index)``, wrapping around."""
    order = np.random.default_rng([seed, round_index]).permutation(n_records)
    return order[np.arange(count) % n_records].tolist()


def run_rounds(settings: RoundsSettings, stage_progress: StageProgress | None = None) -> list[dict]:
    """Run (or continue) the rounds; return every round's metrics.

    ``stage_progress(description)`` gives each stage that runs a context with its ``advance`` callback.
    """
    settings.check()
    out = Path(settings.out)
    off_policy = read_off_policy(settings)
    _claim_out(settings)
    progress = stage_progress or (lambda description: nullcontext(lambda *args, **fields: None))
    records = []
    for round_index in range(settings.rounds):
        folder = RoundFolder.of(out, round_index)
        if folder.metrics.is_file():
            log.info("round %d done already, skipped", round_index)
        else:
            _run_round(settings, round_index, progress, off_policy)
        records.append(json.loads(folder.metrics.read_text()))
        write_atomic(out / ROUNDS_LOG_NAME, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))
    return records


def _claim_out(settings: RoundsSettings) -> None:
    """Record the settings in ``OUT/rounds.json``, refusing a folder that holds other rounds or other files."""
    out = Path(settings.out)
    record = settings.to_json()
    saved_path = out / SETTINGS_NAME
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        differ = [k for k, v in record.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if differ:
            raise LogitcacheError(
                f"--out {out} holds rounds run with other settings ({', '.join(differ)}); "
                "rerun with those, or choose another --out"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise LogitcacheError(f"--out {out} holds files that are not `logitcache rounds` output; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, record)


def _run_round(settings: RoundsSettings, round_index: int, progress: StageProgress, off_policy: list[dict]) -> None:
    """One round, each finished stage skipped (module docstring); ``metrics.json`` last."""
    folder = RoundFolder.of(settings.out, round_index)
    folder.path.mkdir(parents=True, exist_ok=True)
    student = round_student(settings, round_index)
    name = f"round {round_index}"
    corpus = folder.mixed if settings.off_policy_fraction > 0 else folder.generated

    def generate() -> None:
        _write_round_prompts(settings, round_index, folder.prompts)
        with progress(f"{name}: generate") as advance:
            run_generate(settings.generate_settings(round_index, student, folder.prompts, folder.generated),
                         on_progress=lambda done, total: advance(completed=done, total=total))

    def build() -> None:
        with progress(f"{name}: build ({settings.method})") as advance:
            run_build(settings.build_settings(round_index, corpus, folder.cache), on_windows=advance)

    def train() -> None:
        resume = find_checkpoint(folder.train) is not None
        with progress(f"{name}: train") as advance:
            run_train(settings.train_settings(round_index, folder.cache, student, folder.train, resume),
                      on_step=lambda r: advance(completed=r["step"], total=settings.steps) if r["kind"] == "train" else None)

    def evaluate() -> dict:
        with progress(f"{name}: evaluate") as advance:
            scores = run_evaluate(settings.evaluate_settings(folder.student),
                                  on_progress=lambda done, total: advance(completed=done, total=total))
        return {"scores": {"exact_match": scores["exact_match"], "rouge_l": scores["rouge_l"]}}

    _run_stage(folder, name, "generate", "generate" in _stages(folder), generate)
    if corpus == folder.mixed:
        _run_stage(folder, name, "mix", folder.mixed.is_file(),
                   lambda: _write_mixed(settings, round_index, off_policy, folder.generated, folder.mixed))
    _run_stage(folder, name, "build", (folder.cache / MANIFEST_NAME).is_file(), build)
    _run_stage(folder, name, "train", (folder.student / "config.json").is_file(), train)
    if settings.eval_prompts is not None:
        _run_stage(folder, name, "evaluate", "evaluate" in _stages(folder), evaluate)
    write_json_atomic(folder.metrics, round_metrics(settings, round_index))


def _stages(folder: RoundFolder) -> dict:
    """``stages.json``: ``{stage: {"seconds": wall time or None, ...}}`` of the round's finished stages."""
    return json.loads(folder.stages.read_text()) if folder.stages.is_file() else {}


def _run_stage(folder: RoundFolder, name: str, stage: str, done: bool, work: Callable[[], dict | None]) -> None:
    """Run ``work`` unless the stage is ``done``, and record its wall time (and what it returns) in ``stages.json``."""
    if done:
        log.info("%s: %s done already, skipped", name, stage)
        if stage not in _stages(folder):  # finished by a run that stopped before recording it: time unknown
            write_json_atomic(folder.stages, {**_stages(folder), stage: {"seconds": None}})
        return
    start = time.perf_counter()
    entry = work() or {}
    write_json_atomic(folder.stages, {**_stages(folder), stage: {"seconds": time.perf_counter() - start, **entry}})


def _write_round_prompts(settings: RoundsSettings, round_index: int, path: Path) -> None:
    """The round's prompts as JSON Lines in the prompts' format, without reference answers, with ``index``."""
    prompts = read_prompts(settings.prompts, settings.fields)
    order = round_prompt_order(len(prompts), settings.prompts_per_round, settings.seed, round_index)
    lines = [json.dumps({"index": i, **_record(settings, prompts[i][2], None)}, ensure_ascii=False) + "\n" for i in order]
    write_atomic(path, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))


def _record(settings: RoundsSettings, prompt: list[dict], answer: str | None) -> dict:
    """A record in the prompts' format: ``prompt`` messages, and ``answer`` as the assistant's turn when given."""
    fields = settings.fields
    if fields.format == "chat":
        answered = [] if answer is None else [{"role": "assistant", "content": answer}]
        return {fields.messages_field: [*prompt, *answered]}
    return {fields.prompt_field: prompt[0]["content"], **({} if answer is None else {fields.response_field: answer})}


def read_off_policy(settings: RoundsSettings) -> list[dict]:
    """``--off-policy-data``'s records with their reference answers, marked ``off_policy`` (module docstring);
    a record without a reference answer is refused."""
    if settings.off_policy_data is None:
        return []
    records = []
    for index, where, prompt, reference in read_prompts(settings.off_policy_data, settings.fields):
        if reference is None:
            raise LogitcacheError(
                f"--off-policy-data {settings.off_policy_data}: {where} has no reference answer (a final assistant "
                "turn, or a response) to train on")
        records.append({"index": index, **_record(settings, prompt, reference), "off_policy": True})
    return records


def _write_mixed(settings: RoundsSettings, round_index: int, off_policy: list[dict], generated: Path, mixed: Path) -> None:
    """``mixed.jsonl``: the generated records, then the round's share of ``off_policy`` (module docstring)."""
    on_policy = [{**json.loads(line), "off_policy": False} for line in generated.read_text(encoding="utf-8").splitlines()]
    count = off_policy_count(len(on_policy), settings.off_policy_fraction)
    picked = [off_policy[i] for i in off_policy_order(len(off_policy), count, settings.seed, round_index)]
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in on_policy + picked]
    generation = settings_path(generated).read_text()
    write_atomic(settings_path(mixed), lambda tmp: tmp.write_text(generation))  # names the student that answered
    write_atomic(mixed, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))


def round_metrics(settings: RoundsSettings, round_index: int) -> dict:
    """Round ``round_index``'s record, from its files: the student it started from, each stage's wall
    time and fraction of the round's, the counts of prompts, generated, empty and unfinished responses,
    off-policy records and cache examples, the training's final loss and the evaluation's scores."""
    folder = RoundFolder.of(settings.out, round_index)
    stages = _stages(folder)
    seconds = {stage: stages[stage]["seconds"] for stage in TIMED_STAGES if stage in stages}
    total = None if None in seconds.values() else sum(seconds.values())
    prompts = len(folder.prompts.read_text().splitlines())
    generated = [json.loads(line) for line in folder.generated.read_text(encoding="utf-8").splitlines()]
    off_policy = len(folder.mixed.read_text().splitlines()) - len(generated) if folder.mixed.is_file() else 0
    corpus = read_manifest(folder.cache)["corpus"]
    train = final_metrics(read_metrics(folder.train / METRICS_NAME), folder.student)
    metrics = {
        "round": round_index,
        "started_from": str(round_student(settings, round_index)),
        "student": train["student"],
        "seconds": {**seconds, "round": total},
        "fractions": {stage: s / total for stage, s in seconds.items()} if total else {},
        "prompts": prompts,
        "generated": len(generated),
        "empty": prompts - len(generated),
        "unfinished": sum(not r["finished"] for r in generated),
        "off_policy": off_policy,
        "examples": corpus["examples"],
        "target_positions": corpus["target_positions"],
        "train_steps": train["step"],
        "train_loss": train["loss"],
    }
    if "evaluate" in stages:
        metrics.update({f"eval_{k}": v for k, v in stages["evaluate"].get("scores", {}).items()})
    return metrics
