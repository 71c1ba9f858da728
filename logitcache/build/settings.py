"""``logitcache build``'s settings: one frozen dataclass, one field per CLI option, checked before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from logitcache.cache.format import MAX_IDS_PER_POSITION, METHODS
from logitcache.chat import CORPUS_FORMATS, LENGTH_POLICIES, RecordFields
from logitcache.corpus import BOS_POLICIES, PACKINGS, Corpus
from logitcache.errors import LogitcacheError
from logitcache.targets.spec import SAMPLE_LOGPROB_BITS, TargetSpec
from logitcache.teacher.options import TeacherOptions

TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BuildSettings:
    """Everything ``logitcache build`` takes, one field per CLI option."""

    teacher: Path
    corpus: Path
    out: Path
    method: str = "topk"
    k: int = 32
    samples: int = 50
    seed: int = 0
    proposal_temperature: float = 1.0
    logprob_bits: int = SAMPLE_LOGPROB_BITS
    seq_len: int = 512
    bos: str = "auto"
    packing: str = "documents"
    batch_size: int = 8
    shard_size: int = 1024
    text_field: str = "text"
    format: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    chat_template: Path | None = None
    too_long: str = "truncate"
    overwrite: bool = False
    backend: str = "hf"
    device: str | None = None
    dtype: str | None = None
    chunk_mib: int | None = None
    cpu_streams: int | None = None
    num_workers: int = 1
    worker_index: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int | None = None
    ray: bool = False

    def teacher_options(self) -> TeacherOptions:
        return TeacherOptions(
            backend=self.backend, device=self.device, dtype=self.dtype, chunk_mib=self.chunk_mib, seq_len=self.seq_len,
            spec=self.spec, tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization, max_num_seqs=self.max_num_seqs,
        )

    @property
    def record_fields(self) -> RecordFields:
        return RecordFields(self.format, self.messages_field, self.prompt_field, self.response_field)

    @property
    def spec(self) -> TargetSpec:
        return TargetSpec(self.method, self.k, self.samples, self.seed, self.proposal_temperature, self.logprob_bits)

    def check(self) -> None:
        """Reject settings that can never work, before anything is loaded or written."""
        if self.method not in METHODS:
            raise LogitcacheError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        rules = [
            (self.bos in BOS_POLICIES, f"--bos {self.bos!r}: choose one of {', '.join(BOS_POLICIES)}"),
            (self.packing in PACKINGS, f"--packing {self.packing!r}: choose one of {', '.join(PACKINGS)}"),
            (self.format in CORPUS_FORMATS, f"--format {self.format!r}: choose one of {', '.join(CORPUS_FORMATS)}"),
            (self.too_long in LENGTH_POLICIES, f"--too-long {self.too_long!r}: choose one of {', '.join(LENGTH_POLICIES)}"),
            (self.format == "text" or self.bos == "auto",
             f"--bos {self.bos}: --format {self.format} renders what the chat template writes (its own BOS or none)"),
            (self.format == "text" or self.packing == "documents",
             f"--format {self.format} keeps one example per row: --packing stream does not apply"),
            (self.chat_template is None or Path(self.chat_template).is_file(), f"--chat-template {self.chat_template}: no such file"),
            (self.seq_len >= 2, f"--seq-len {self.seq_len}: need at least 2 tokens per window"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.shard_size >= 1, f"--shard-size {self.shard_size}: must be at least 1"),
            (self.k >= 1, f"--k {self.k}: must be at least 1"),
            (self.samples >= 1, f"--samples {self.samples}: N must be at least 1"),
            (self.k <= MAX_IDS_PER_POSITION and self.samples <= MAX_IDS_PER_POSITION,
             f"--k/--samples: at most {MAX_IDS_PER_POSITION} ids per position"),
            (self.proposal_temperature > 0, "--proposal-temperature must be positive"),
            (0 <= self.logprob_bits <= 10,
             f"--logprob-bits {self.logprob_bits}: stored log-probabilities keep 1 to 10 mantissa bits (0: none stored)"),
            (self.logprob_bits > 0 or self.method == "sample",
             "--logprob-bits 0 leaves out a sample cache's log-probabilities; a top-k cache is its log-probabilities"),
            (self.logprob_bits > 0 or self.proposal_temperature == 1,
             f"--logprob-bits 0 with --proposal-temperature {self.proposal_temperature}: RS-KD weights draws from a "
             "tempered proposal by the teacher's log-probabilities; keep them (--logprob-bits 7)"),
            (self.cpu_streams is None or self.cpu_streams >= 1, f"--cpu-streams {self.cpu_streams}: must be at least 1"),
            (self.chunk_mib is None or self.chunk_mib >= 1, f"--chunk-mib {self.chunk_mib}: must be at least 1"),
            (self.dtype in (None, *TEACHER_DTYPES), f"--dtype {self.dtype}: choose one of {', '.join(TEACHER_DTYPES)}"),
            (self.num_workers >= 1 and 0 <= self.worker_index < self.num_workers,
             f"--worker-index {self.worker_index} must be in [0, --num-workers {self.num_workers})"),
            (not (self.overwrite and self.num_workers > 1),
             "--overwrite with several workers would delete each other's shards; empty the folder first"),
            (0 < self.gpu_memory_utilization <= 1, f"--gpu-memory-utilization {self.gpu_memory_utilization}: a fraction in (0, 1]"),
            (self.tensor_parallel_size >= 1, f"--tensor-parallel-size {self.tensor_parallel_size}: must be at least 1"),
            (self.max_num_seqs is None or self.max_num_seqs >= 1, f"--max-num-seqs {self.max_num_seqs}: must be at least 1"),
        ]
        for ok, message in rules:
            if not ok:
                raise LogitcacheError(message)
        Corpus.open(self.corpus, self.text_field)  # a missing or unreadable corpus fails before the teacher loads
        corpus, out = Path(self.corpus).resolve(), Path(self.out).resolve()
        if corpus.is_dir() and (out == corpus or corpus in out.parents):
            raise LogitcacheError(
                f"--out {self.out} lies inside --corpus {self.corpus}: a re-run (a resume) would read the cache's own "
                "shards as corpus documents; write the cache outside the corpus folder"
            )
