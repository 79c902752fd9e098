"""The training loop (trainer.py), its hooks, the checkpointer, the solver, DefaultTrainer (defaults.py: a
config made into a run) and the run guard (output-folder lock, signals)."""
