"""The train stage: ``logitcache train``, a student from a cache (distillation) or from raw text (cross-entropy).

Two sources of data, one loop:

- ``--cache DIR --loss NAME``: step batches stream from the cache (:mod:`logitcache.loader`) and
  the loss (:mod:`logitcache.losses`) compares the student with the cached teacher targets.
  Eval windows come from ``--eval-cache`` or are the last ``--eval-windows`` windows of the cache,
  held out of training by the loader.
- ``--corpus PATH --tokenizer DIR``: the text is packed into windows (:mod:`logitcache.corpus`),
  the last ``--eval-windows`` are held out and the loss is cross-entropy on the next token. The
  windows are kept in memory: this mode is meant for small corpora (the demo pretrains its
  teacher with it).

One optimizer step takes a *global batch* of ``batch_size * grad_accum * processes`` windows: each
process takes ``grad_accum`` micro-batches of ``batch_size``. Losses return sums; every micro-batch
is divided by the counted positions of the WHOLE global step (summed over processes), so
accumulation and processes give the gradient of one large batch.

Several processes (``torchrun --nproc-per-node N -m logitcache train ...``) each read their own
columns of every global batch and train one student with DDP, or with ``--fsdp`` sharded by FSDP2
(:mod:`.distributed`). Eval batches are split over the processes and the sums all-reduced. Process 0
alone writes metrics, checkpoints, the student and the plot. A checkpoint resumes exactly, on any
number of processes that divides its global batch (:mod:`.checkpoint`).

Files under ``--out``::

    metrics.jsonl   one JSON object per train step {"kind": "train", ...} and per eval {"kind": "eval", ...}
    checkpoint/     the model (save_pretrained), trainer.pt (optimizer, scheduler, data position,
                    step, RNG state, settings) and settings.json; replaced atomically
    student/        the final student (+ its tokenizer when known): AutoModelForCausalLM loads it
    loss.png        train and eval losses against steps

The modules, in the order a run uses them:

- :mod:`.settings`: :class:`~.settings.TrainSettings`, one field per CLI option, checked up front;
- :mod:`.distributed`: the process group, DDP/FSDP2 and sums over processes;
- :mod:`.checkpoint`: claiming ``--out``, checkpoints and exact resume, the final student;
- :mod:`.data`: the train stream and eval batches of a cache or a corpus;
- :mod:`.student`: the student model: presets, building, loading, checks against the data;
- :mod:`.optim`: AdamW and the warmup-then-cosine LR schedule;
- :mod:`.objective`: the loss bound to its options and cache, plain or fused with the output head;
- :mod:`.evaluate`: LM loss, KD loss, ECE and top-1 agreement on the eval batches;
- :mod:`.metrics`: ``metrics.jsonl`` and ``loss.png``;
- :mod:`.loop`: :func:`~.loop.run_train`, the training loop that uses them all.
"""
