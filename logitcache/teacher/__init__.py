"""The teacher stage: a model folder → final hidden states → output head in row chunks → sparse targets.

Full ``[batch, seq, vocab]`` float32 logits are never held. The ``hf`` backend (:mod:`.hf`) runs the
model's decoder to get final hidden states ``[B, T, H]`` (small: H ≪ V), then applies the output head
(:mod:`.head`), log-softmax and target extraction to ``chunk_rows`` positions at a time
(:mod:`.host`). Peak memory beyond the model and its activations is about
``chunk_rows × V × 4 bytes × 3`` (logits, log-probabilities and the sampler's probabilities) plus,
for ``sample``, the sampler's scratch per draw (it matters for large N; see
:func:`logitcache.targets.rows.row_bytes`). ``chunk_mib`` bounds it whatever the batch or sequence
length; by default 1 GiB on CUDA and 16 MiB on CPU but at least 128 rows, so that each read of the
head weight serves enough rows (:mod:`.options` says why). The ``vllm`` backend (:mod:`.vllm`)
gives the same targets from a vLLM engine.

:mod:`.base` says what a backend provides (:class:`~.base.Teacher`) and loads one; :mod:`.folder`
reads what identifies a model folder (fingerprints, tokenizer, context length).
"""
