"""What a build stores per position: :class:`TargetSpec` (no torch here: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_LOGPROB_BITS = 7  # shard format v2: the byte-stream-split float32 column is smallest at 7 (benchmarks/RESULTS.md)


@dataclass(frozen=True)
class TargetSpec:
    """What to store per position: ``topk`` with ``k`` ids, or ``sample`` with ``samples`` draws.

    ``logprob_bits``: mantissa bits (of float16's 10) kept in a sample build's ``target_logprobs``.
    RS-KD learns from the counts, whose noise (~1/sqrt(count)) dwarfs a 2**-8 relative error in a
    log-probability; 7 bits saves ~0.4 bytes per entry. top-k keeps all 10, and gold always does.
    0: a sample cache stores no ``target_logprobs`` at all (format v4), only ids and counts.
    """

    method: str
    k: int = 32
    samples: int = 50
    seed: int = 0
    proposal_temperature: float = 1.0
    logprob_bits: int = SAMPLE_LOGPROB_BITS

    @property
    def params(self) -> dict:
        if self.method == "topk":
            return {"k": self.k}
        return {"samples": self.samples, "proposal_temperature": self.proposal_temperature, "logprob_bits": self.logprob_bits}
