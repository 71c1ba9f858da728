"""Sparse targets from rows of teacher logits: top-k, and exact importance sampling (RS-KD).

Every function takes a chunk of rows (``[R, V] float32``, one row per position) on any device
and returns small per-row results (:class:`~logitcache.targets.topk.RowTargets`). Row chunks are
independent, so the caller (the teacher backends) bounds memory by the chunk size.

- :mod:`.spec`: what a build stores per position (:class:`~.spec.TargetSpec`) and its memory per row;
- :mod:`.rng`: counter-based random numbers, a pure function of (seed, sequence_id, position, draw);
- :mod:`.topk` and :mod:`.sample`: the torch reference of each method;
- :mod:`.kernels`: the same two in compiled C on CPU (:mod:`logitcache.native`);
- :mod:`.rows`: :func:`~.rows.row_targets`, which picks between them.
"""
