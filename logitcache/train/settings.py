"""The settings of ``logitcache train``: one frozen dataclass, one field per CLI option, saved in every checkpoint.

:meth:`TrainSettings.check` refuses settings that can never work before anything is loaded or
written, naming the option to fix: exactly one data source (``--cache`` with a ``--loss`` that suits
how the cache was built, or ``--corpus`` with ``--tokenizer`` and ``ce``), exactly one student
source, and each loss-specific option (:data:`LOSS_OPTIONS`) only with the losses that take it. A
resume compares the checkpoint's settings with these (:mod:`.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from logitcache.cache.format import has_behavior, stores_logprobs
from logitcache.cache.manifest import cache_layout, read_manifest
from logitcache.chat import CORPUS_FORMATS, LENGTH_POLICIES, RecordFields
from logitcache.errors import LogitcacheError

# Loss-specific settings: field -> (CLI option, the loss's keyword, the losses that take it); None
# leaves the loss's own default.
LOSS_OPTIONS = {
    "skew": ("skew", "skew", ("skew-kl", "skew-reverse-kl")),
    "jsd_beta": ("jsd-beta", "beta", ("gkd-jsd",)),
    "pg_clip": ("pg-clip", "clip", ("minillm",)),
    "pg_baseline": ("pg-baseline", "baseline", ("minillm",)),
    "loss_k": ("loss-k", "k", ("bild", "rlkd")),
    "rank_temperature": ("rank-temperature", "rank_temperature", ("rlkd",)),
    "rlkd_base": ("rlkd-base", "base", ("rlkd",)),
}


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``logitcache train`` takes, one field per CLI option; saved in every checkpoint."""

    out: Path
    cache: Path | None = None
    loss: str | None = None
    corpus: Path | None = None
    tokenizer: Path | None = None
    seq_len: int = 512
    bos: str = "auto"  # with corpus: the layout of logitcache.corpus, as a build's
    packing: str = "stream"
    text_field: str = "text"
    format: str = "text"  # with corpus: text, or chat / prompt-response records (SFT: CE on the assistant's tokens)
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    chat_template: Path | None = None
    too_long: str = "truncate"
    pack: bool = True  # a cache's rows of different lengths: several per student row, each seen alone
    eval_prompts: Path | None = None  # chat / prompt-response records with references: exact match, ROUGE-L at each eval
    eval_max_new_tokens: int = 64
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: default_warmup(steps)
    weight_decay: float = 0.1
    clip: float = 1.0
    alpha: float = 0.0
    temperature: float | None = None
    skew: float | None = None
    jsd_beta: float | None = None
    pg_clip: float | None = None
    pg_baseline: str | None = None
    loss_k: int | None = None
    rank_temperature: float | None = None
    rlkd_base: str | None = None
    eval_every: int = 100
    eval_windows: int = 64
    eval_cache: Path | None = None
    save_every: int = 500
    resume: bool = False
    seed: int = 0
    student: str | None = None
    student_config: Path | None = None
    init_from: Path | None = None
    compile: bool = False
    fused_loss: bool = True
    device: str | None = None
    fsdp: bool = False
    lanes: int | None = None

    @property
    def record_fields(self) -> RecordFields:
        return RecordFields(self.format, self.messages_field, self.prompt_field, self.response_field)

    def check(self) -> None:
        """Reject settings that can never work, before anything is loaded or written."""
        # torch loads here, not when this module does: the CLI reads the defaults above at every start.
        from logitcache.losses.sparse import check_options, get_loss
        from logitcache.train.student import check_source

        if (self.cache is None) == (self.corpus is None):
            raise LogitcacheError(
                "give --cache DIR (distil from a cache) or --corpus PATH --tokenizer DIR (cross-entropy on text), not both"
            )
        if self.cache is not None:
            if self.loss is None:
                raise LogitcacheError("--cache needs --loss: e.g. rs-kd for a sampled cache, topk-ghost for a top-k one")
            get_loss(self.loss)
        else:
            rules = [
                (self.tokenizer is not None, "--corpus needs --tokenizer DIR to turn the text into tokens"),
                (self.loss in (None, "ce"), f"--loss {self.loss} needs a teacher: with --corpus only ce works"),
                (self.eval_cache is None, "--eval-cache goes with --cache; --corpus holds out its own last windows"),
                (self.seq_len >= 2, f"--seq-len {self.seq_len}: need at least 2 tokens per window"),
                (self.format in CORPUS_FORMATS, f"--format {self.format!r}: choose one of {', '.join(CORPUS_FORMATS)}"),
                (self.too_long in LENGTH_POLICIES, f"--too-long {self.too_long!r}: choose one of {', '.join(LENGTH_POLICIES)}"),
                (self.chat_template is None or Path(self.chat_template).is_file(), f"--chat-template {self.chat_template}: no such file"),
            ]
            _enforce(rules)
        _enforce([
            (self.eval_prompts is None or Path(self.eval_prompts).is_file(), f"--eval-prompts {self.eval_prompts}: no such file"),
            (self.eval_prompts is None or self.eval_every > 0, "--eval-prompts scores at each evaluation: set --eval-every"),
            (self.eval_max_new_tokens >= 1, f"--eval-max-new-tokens {self.eval_max_new_tokens}: must be at least 1"),
            (not Path(self.out).exists() or Path(self.out).is_dir(), f"--out {self.out} is a file; give a folder"),
            (self.steps >= 1, f"--steps {self.steps}: must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.grad_accum >= 1, f"--grad-accum {self.grad_accum}: must be at least 1"),
            (self.lr > 0, f"--lr {self.lr}: must be positive"),
            (0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio {self.min_lr_ratio}: must lie in [0, 1]"),
            (self.warmup_steps is None or 0 <= self.warmup_steps < self.steps,
             f"--warmup-steps {self.warmup_steps}: must be >= 0 and below --steps {self.steps} (else the LR never decays)"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0"),
            (self.clip >= 0, f"--clip {self.clip}: must be >= 0 (0 turns clipping off)"),
            (0 <= self.alpha <= 1, f"--alpha {self.alpha}: must lie in [0, 1] ((1 - alpha) * kd + alpha * ce)"),
            (self.temperature is None or self.temperature > 0, f"--temperature {self.temperature}: must be positive"),
            (self.eval_every >= 0, f"--eval-every {self.eval_every}: must be >= 0 (0 turns eval off)"),
            (self.eval_windows >= 1 or not self.eval_every, f"--eval-windows {self.eval_windows}: must be at least 1"),
            (self.save_every >= 0, f"--save-every {self.save_every}: must be >= 0 (0: only at the end)"),
            (self.seed >= 0, f"--seed {self.seed}: must be >= 0"),
            (self.lanes is None or self.lanes >= 1, f"--lanes {self.lanes}: must be at least 1"),
        ])
        check_source(self.student, self.student_config, self.init_from)
        for field, (option, _, losses) in LOSS_OPTIONS.items():
            if getattr(self, field) is not None and self.loss not in losses:
                raise LogitcacheError(f"--{option} goes with --loss {' or '.join(losses)}, not --loss {self.loss or 'ce'}")
        check_options(self.loss or "ce", alpha=self.alpha, temperature=self.temperature, **self.loss_options())
        if self.cache is not None:  # the loss must suit how each cache was built (rs-kd needs a sampled one)
            options_from_cache(self.loss, read_manifest(self.cache), self.cache_option())
            if self.eval_cache is not None and self.eval_every:
                options_from_cache(self.loss, read_manifest(self.eval_cache), self.cache_option("--eval-cache"))

    @property
    def warmup(self) -> int:
        """``--warmup-steps``, else :func:`default_warmup` of ``--steps``."""
        return default_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps

    def loss_options(self) -> dict[str, float | str]:
        """The loss-specific options given (``skew``, ``k``, ...), as the loss's keyword arguments."""
        given = {field: getattr(self, field) for field in LOSS_OPTIONS}
        return {LOSS_OPTIONS[field][1]: value for field, value in given.items() if value is not None}

    def cache_option(self, option: str = "--cache") -> str:
        """``--cache DIR``, or for ``option`` ``--eval-cache`` the eval cache when given, for error messages."""
        if option == "--eval-cache" and self.eval_cache:
            return f"--eval-cache {self.eval_cache}"
        return f"--cache {self.cache}"

    def to_json(self) -> dict:
        """The settings as JSON values (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def options_from_cache(loss: str, manifest: Mapping | None, where: str) -> dict[str, float]:
    """The options ``loss`` takes from the cache it reads: for ``rs-kd`` the proposal temperature the
    cache was sampled at, none for the others. A cache not built by sampling is refused for ``rs-kd``, one
    without log-probabilities (``--logprob-bits 0``) for every loss but ``rs-kd`` (and ``ce``, which reads no targets);
    ``where`` names it (``--cache DIR``). ``minillm`` needs a cache of responses :func:`minillm_ready` accepts."""
    if manifest is not None and loss not in ("rs-kd", "ce") and not stores_logprobs(manifest["method"], manifest["params"]):
        raise LogitcacheError(
            f"--loss {loss} needs the teacher's log-probabilities, and {where} was built with --logprob-bits 0 "
            "(ids and counts only): use --loss rs-kd, or rebuild it with --logprob-bits 7"
        )
    if loss == "minillm":
        minillm_ready(manifest, where)
    if loss != "rs-kd":
        return {}
    if manifest["method"] != "sample":
        raise LogitcacheError(
            f"--loss rs-kd needs a cache built with --method sample; {where} is {manifest['method']} "
            "(use topk-ghost, topk-renorm or kl)"
        )
    return {"proposal_temperature": manifest["params"]["proposal_temperature"]}


def minillm_ready(manifest: Mapping, where: str) -> None:
    """Refuse a cache ``minillm`` cannot learn from: it needs a format v3 (or later) cache of a chat or prompt-response corpus
    holding generated responses (``corpus.sampled`` > 0) drawn at temperature 1 with top-p 1 (``corpus.generated_by``),
    so that each token's recorded sampling log-probability is the generating student's own log-probability, as
    its importance ratios and rewards take it."""
    corpus = manifest.get("corpus", {})
    drawn_by = corpus.get("generated_by") or {}
    problem = None
    if not has_behavior(manifest["format_version"], cache_layout(manifest)["format"]):
        problem = "is not a format v3 (or later) cache of a chat or prompt-response corpus"
    elif not corpus.get("sampled"):
        problem = "holds no generated response (none of its records has response_ids and response_logprobs)"
    elif (drawn_by.get("temperature"), drawn_by.get("top_p")) != (1.0, 1.0):
        problem = (f"holds responses drawn at temperature {drawn_by.get('temperature')} and top-p {drawn_by.get('top_p')}: "
                   "their recorded log-probabilities are not the student's own")
    if problem:
        raise LogitcacheError(f"--loss minillm needs the student's own samples, drawn at temperature 1 and top-p 1 by "
                              f"`logitcache generate`; {where} {problem}")


def default_warmup(steps: int) -> int:
    """Warmup steps when ``--warmup-steps`` is not given: 100, or a tenth of the run if that is less."""
    return min(100, steps // 10)


def _enforce(rules: list[tuple[bool, str]]) -> None:
    for ok, message in rules:
        if not ok:
            raise LogitcacheError(message)
