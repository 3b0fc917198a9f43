"""The training run: settings and their checks, the output folder and its checkpoints, the trainer with its
callbacks and validation, and the run's record."""
