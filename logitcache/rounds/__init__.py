"""``logitcache rounds``: on-policy distillation in rounds, the teacher run offline once per round.

Round ``r`` generates with the round-``r`` student (``generate``), scores the answers with the
teacher (``build --format chat``), and trains the student from its own weights on that cache
(``train --init-from``); :mod:`.run` drives the stages, :mod:`.settings` holds the options.
"""
