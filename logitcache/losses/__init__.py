"""The losses stage: sparse KD losses on cached targets (:mod:`.sparse`) and the same losses fused with the
student's output head, by chunks of rows (:mod:`.fused`). Contracts: docs/CONTRACTS.md.
"""
