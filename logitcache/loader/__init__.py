"""The loader stage: a cache → training batches, sharded over ranks and workers, shuffled
deterministically, resumable exactly.

- :mod:`.partition`: the order (pure index math of sizes, seed, epoch and world; no I/O);
- :mod:`.dataset`: :class:`~.dataset.CacheDataset`, which reads what that order asks for;
- :mod:`.collate`: one-window targets → the dense batch of docs/CONTRACTS.md.
"""
