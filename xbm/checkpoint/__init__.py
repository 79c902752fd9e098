"""Checkpoint files: written atomically, read with weights_only=True (io.py), and the config a tool reads
one with (config.py). What goes into a training checkpoint and how a run resumes: xbm/engine/checkpointer.py."""
