"""Teacher backends beyond the built-in ``hf`` one (see :mod:`logitcache.teacher`)."""
