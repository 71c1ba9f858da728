"""The build stage: settings (:mod:`.settings`) → plan, the build's identity (:mod:`.plan`) → pipeline
(:mod:`.pipeline`) → run (:mod:`.run`), which writes shards and the manifest. Executors that run
several workers (:mod:`logitcache.executors`) call :func:`~.run.run_build`; nothing here imports them.
"""
