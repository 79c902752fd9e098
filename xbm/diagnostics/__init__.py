"""Diagnostics of a run: the drift of a fixed probe set's embeddings (drift.py) and the memory's adaptation
error, stored and enqueued entries against fresh embeddings of their images (memory_drift.py); build.py
builds both from the config (DRIFT.*)."""
