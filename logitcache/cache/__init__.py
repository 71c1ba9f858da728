"""The cache: Parquet shards of sparse targets (:mod:`.format`), file names (:mod:`.layout`), the manifest
(:mod:`.manifest`), and what reads a finished cache: ``validate`` (:mod:`.validate`), ``inspect``
(:mod:`.summary`) and ``merge`` of a multi-worker build's parts (:mod:`.merge`). The format is
published in ``schemas/``.
"""
