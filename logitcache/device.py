"""``--device``: a torch device from the user's words (default cuda if present, else cpu), refused clearly when absent."""

from __future__ import annotations

import torch

from logitcache.errors import LogitcacheError


def resolve_device(device: str | None) -> torch.device:
    """``--device`` as a torch device (default: cuda if present, else cpu); a bad or absent one is refused."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise LogitcacheError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LogitcacheError(f"--device {device}: this machine's torch has no CUDA device; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise LogitcacheError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return resolved
