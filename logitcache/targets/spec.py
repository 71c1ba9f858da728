"""What a build stores per position: :class:`TargetSpec` (no torch here: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_LOGPROB_BITS = 8


@dataclass(frozen=True)
class TargetSpec:
    """What to store per position: ``topk`` with ``k`` ids, or ``sample`` with ``samples`` draws.

    ``logprob_bits``: fraction bits of a sample build's fixed-point ``target_logprobs`` (shard format v2).
    RS-KD learns from the counts, whose noise (~1/sqrt(count)) dwarfs a 2**-9 nats error in a
    log-probability; top-k keeps 10 bits, and gold always does (logitcache.cache.format.LOGPROB_BITS).
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
