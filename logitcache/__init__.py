"""logitcache: run the teacher once, cache sparse targets, distil students from the cache."""

__version__ = "0.1.0"
