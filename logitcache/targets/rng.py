"""Counter-based random numbers for the sampler: draw ``j`` of row ``r`` uses the uniform
``hash(seed, sequence_id, position, j)`` (splitmix64), so a sample depends only on (seed,
sequence_id, position) and never on batch size, batch order or device.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores it."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)


_MIX1 = _signed(0xBF58476D1CE4E5B9)


_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic): a strong 64-bit mixer."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def row_keys(seed: int, sequence_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row from (seed, sequence_id, position): ``[R] int64``."""
    key = splitmix64(torch.full_like(sequence_ids, _signed(seed)))
    key = splitmix64(key ^ sequence_ids)
    return splitmix64(key ^ positions)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[R, n] float64`` uniforms in [0, 1): draw ``j`` of row ``r`` is a function of (keys[r], j) only."""
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    bits = splitmix64(keys[:, None] * _GOLDEN + j[None, :])
    return _shr(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


def sorted_uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[R, n] float64``: the order statistics of ``n`` uniforms on [0, 1), ascending within each row.

    ``S_j / S_{n+1}`` for the running sums ``S`` of ``n + 1`` exponential variables has exactly the
    distribution of ``n`` sorted uniforms, so draws made from them come out sorted with no sort.
    A function of ``keys`` only, like :func:`uniforms`.
    """
    sums = torch.cumsum(-torch.log1p(-uniforms(keys, n + 1)), dim=1)
    return sums[:, :n] / sums[:, n:].clamp_min(2.0**-1000)
