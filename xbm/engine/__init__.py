"""The training loop, evaluation and checkpointing."""
