"""``logitcache rounds``'s settings: one frozen dataclass, one field per CLI option, and the settings of
each stage of a round (generate, build, train, evaluate) derived from it.

Defaults that mean the same as another command's are read from that command's settings dataclass
(one source per default). Per round ``r``, the generation, build and training seeds are ``seed + r``.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from logitcache.build.settings import BuildSettings
from logitcache.cache.format import FORMAT_VERSION
from logitcache.chat import RecordFields
from logitcache.errors import LogitcacheError
from logitcache.generate.settings import EvaluateSettings, GenerateSettings
from logitcache.train.settings import LOSS_OPTIONS, TrainSettings, options_from_cache

# What a rerun may change: none of these alters what a finished round computed (--rounds adds rounds).
RESUMABLE_CHANGES = ("out", "rounds", "device", "generate_batch_size", "build_batch_size")


@dataclass(frozen=True, kw_only=True)
class RoundsSettings:
    """Everything ``logitcache rounds`` takes, one field per CLI option; saved in ``OUT/rounds.json``."""

    teacher: Path
    student: Path  # the round-0 student: a model folder with its tokenizer
    prompts: Path
    out: Path
    loss: str
    rounds: int = 2
    steps: int = 100  # per round
    # generation
    prompts_per_round: int | None = None  # None: every prompt, each round
    temperature: float = 1.0
    top_p: float = GenerateSettings.top_p
    max_new_tokens: int = GenerateSettings.max_new_tokens
    generate_batch_size: int = GenerateSettings.batch_size
    # off-policy records mixed in
    off_policy_fraction: float = 0.0
    off_policy_data: Path | None = None
    # the teacher's build
    method: str = "sample"
    k: int = BuildSettings.k
    samples: int = BuildSettings.samples
    seq_len: int = BuildSettings.seq_len
    build_batch_size: int = BuildSettings.batch_size
    # training
    batch_size: int = TrainSettings.batch_size
    grad_accum: int = TrainSettings.grad_accum
    lr: float = TrainSettings.lr
    warmup_steps: int | None = TrainSettings.warmup_steps
    alpha: float = TrainSettings.alpha
    loss_option: tuple[str, ...] = ()  # "jsd-beta=0.5": train's loss-specific options, by their CLI names
    save_every: int = TrainSettings.save_every
    # records and evaluation
    format: str = GenerateSettings.format
    messages_field: str = GenerateSettings.messages_field
    prompt_field: str = GenerateSettings.prompt_field
    response_field: str = GenerateSettings.response_field
    chat_template: Path | None = None
    eval_prompts: Path | None = None
    device: str | None = None
    seed: int = 0

    @property
    def fields(self) -> RecordFields:
        return RecordFields(self.format, self.messages_field, self.prompt_field, self.response_field)

    def loss_options(self) -> dict[str, object]:
        """``--loss-option NAME=VALUE`` as :class:`TrainSettings` fields (``{"jsd_beta": 0.5}``), typed as those are."""
        by_option = {option: field for field, (option, _, _) in LOSS_OPTIONS.items()}
        types = typing.get_type_hints(TrainSettings)
        options = {}
        for given in self.loss_option:
            name, sep, value = given.partition("=")
            field = by_option.get(name.strip().lstrip("-"))
            if not sep or field is None:
                raise LogitcacheError(
                    f"--loss-option {given!r}: write NAME=VALUE with NAME one of {', '.join(sorted(by_option))}")
            kind = next(t for t in typing.get_args(types[field]) if t is not type(None))
            try:
                options[field] = kind(value.strip())
            except ValueError:
                raise LogitcacheError(f"--loss-option {given!r}: {value!r} is not a {kind.__name__}") from None
            _, _, losses = LOSS_OPTIONS[field]
            if self.loss not in losses:
                raise LogitcacheError(f"--loss-option {name} goes with --loss {' or '.join(losses)}, not --loss {self.loss}")
        return options

    def round_seed(self, round_index: int) -> int:
        """The seed of round ``round_index``'s generation, build and training."""
        return self.seed + round_index

    def generate_settings(self, round_index: int, model: Path, prompts: Path, out: Path) -> GenerateSettings:
        """``model``'s answers to the round's ``prompts``, sampled with the round's seed, into ``out``."""
        return GenerateSettings(
            model=model, prompts=prompts, out=out, format=self.format, messages_field=self.messages_field,
            prompt_field=self.prompt_field, response_field=self.response_field, chat_template=self.chat_template,
            max_new_tokens=self.max_new_tokens, batch_size=self.generate_batch_size, device=self.device,
            temperature=self.temperature, top_p=self.top_p, seed=self.round_seed(round_index),
        )

    def build_settings(self, round_index: int, corpus: Path, out: Path) -> BuildSettings:
        """The teacher's cache of the round's ``corpus`` (generated or mixed records) in ``out``."""
        return BuildSettings(
            teacher=self.teacher, corpus=corpus, out=out, method=self.method, k=self.k, samples=self.samples,
            seed=self.round_seed(round_index), seq_len=self.seq_len, batch_size=self.build_batch_size,
            format=self.format, messages_field=self.messages_field, prompt_field=self.prompt_field,
            response_field=self.response_field, chat_template=self.chat_template, device=self.device,
        )

    def train_settings(self, round_index: int, cache: Path, init_from: Path, out: Path, resume: bool = False) -> TrainSettings:
        """Train from ``init_from``'s weights on the round's cache, no held-out split (``eval_every`` 0);
        ``resume`` from ``out``'s checkpoint."""
        return TrainSettings(
            out=out, cache=cache, loss=self.loss, steps=self.steps, batch_size=self.batch_size,
            grad_accum=self.grad_accum, lr=self.lr, warmup_steps=self.warmup_steps, alpha=self.alpha,
            eval_every=0, save_every=self.save_every, resume=resume, seed=self.round_seed(round_index),
            init_from=init_from, device=self.device, **self.loss_options(),
        )

    def evaluate_settings(self, model: Path) -> EvaluateSettings:
        """``model``'s greedy answers to ``--eval-prompts``, scored."""
        return EvaluateSettings(
            model=model, prompts=self.eval_prompts, format=self.format, messages_field=self.messages_field,
            prompt_field=self.prompt_field, response_field=self.response_field, chat_template=self.chat_template,
            max_new_tokens=self.max_new_tokens, batch_size=self.generate_batch_size, device=self.device,
        )

    def check(self) -> None:
        """Reject settings that can never work, before anything is loaded or written: the round's own
        rules, then each stage's own checks on round 0's settings (the build's on the prompts file)."""
        from logitcache.losses.sparse import check_options  # torch loads here, not at the CLI's start

        rules = [
            (self.rounds >= 1, f"--rounds {self.rounds}: must be at least 1"),
            (self.steps >= 1, f"--steps {self.steps}: must be at least 1"),
            (self.prompts_per_round is None or self.prompts_per_round >= 1,
             f"--prompts-per-round {self.prompts_per_round}: must be at least 1"),
            (Path(self.prompts).exists(), f"--prompts {self.prompts}: no such file or folder"),
            (Path(self.student).is_dir(), f"--student {self.student}: no such model folder"),
            (Path(self.teacher).is_dir(), f"--teacher {self.teacher}: no such model folder"),
            (not Path(self.out).exists() or Path(self.out).is_dir(), f"--out {self.out} is a file; give a folder"),
            (0 <= self.off_policy_fraction < 1, f"--off-policy-fraction {self.off_policy_fraction}: must lie in [0, 1)"),
            ((self.off_policy_fraction > 0) == (self.off_policy_data is not None),
             "--off-policy-fraction above 0 and --off-policy-data FILE go together"),
            (self.off_policy_data is None or Path(self.off_policy_data).exists(),
             f"--off-policy-data {self.off_policy_data}: no such file or folder"),
            (self.eval_prompts is None or Path(self.eval_prompts).exists(), f"--eval-prompts {self.eval_prompts}: no such file"),
            (self.seed >= 0, f"--seed {self.seed}: must be >= 0"),
        ]
        for ok, message in rules:
            if not ok:
                raise LogitcacheError(message)
        first = Path(self.out) / "round-0"
        train = self.train_settings(0, first / "cache", self.student, first / "student")
        # train's own rules, on a copy that reads the prompts as text: the round's cache does not exist yet
        replace(train, cache=None, loss=None, corpus=self.prompts, tokenizer=self.teacher,
                **{field: None for field in LOSS_OPTIONS}).check()
        check_options(self.loss, alpha=self.alpha, **train.loss_options())
        # the round's cache as it will be: this method, built now from the prompts' format
        will_be = {"method": self.method, "params": {"proposal_temperature": 1.0}, "format_version": FORMAT_VERSION,
                   "layout": {"format": self.format},
                   "corpus": {"sampled": 1, "generated_by": {"temperature": self.temperature, "top_p": self.top_p}}}
        options_from_cache(self.loss, will_be, f"each round's cache (--method {self.method}, --temperature {self.temperature}, "
                           f"--top-p {self.top_p})")
        self.generate_settings(0, self.student, self.prompts, first / "generated.jsonl").check()
        self.build_settings(0, self.prompts, first / "cache").check()  # the build's rules, on the prompts file
        if self.eval_prompts is not None:
            self.evaluate_settings(self.student).check()

    def to_json(self) -> dict:
        """The settings as JSON values (paths resolved, as strings)."""
        return {k: str(Path(v).resolve()) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}
