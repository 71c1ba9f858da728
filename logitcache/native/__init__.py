"""Compiled CPU kernels (``kernels.c``): the build's top-k and sampler (:mod:`logitcache.targets.kernels`)
and the loader's dense batch layout (:func:`logitcache.loader.collate.dense_rows`), with torch
(numpy for the loader) as the fallback.

On CPU, torch's passes over ``[rows, V]`` (log-softmax, ``torch.topk``, the sampler's block sums
and scans) cost more than a small teacher's output head. The C kernels do each row in two passes
while it sits in L1. :mod:`.library` compiles them on first use with the system C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) into ``$LOGITCACHE_CACHE_DIR`` (default
``~/.cache/logitcache``), keyed by the source, compiler, flags and CPU, and loads them with ctypes
(calls release the GIL, so CPU streams run them in parallel). Without a compiler, or with
``LOGITCACHE_NATIVE=0``, the fallbacks run; they agree to float32 rounding (see the C file's header).
"""
