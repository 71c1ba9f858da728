"""A model's responses to prompts: ``logitcache generate`` writes them as a corpus that ``build`` reads back,
``logitcache evaluate`` scores them against reference answers.

:mod:`.settings` (the commands' options; no torch, the CLI imports it) → :mod:`.decode` (batched
greedy or top-p decoding with a KV cache, counter-based draws) → :mod:`.run` (prompts in, resumable
JSON Lines out) and :mod:`.tasks` (exact match and ROUGE-L against references). Prompts are rendered
by :mod:`logitcache.chat`.
"""
