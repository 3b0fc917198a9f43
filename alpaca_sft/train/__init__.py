"""Settings, the model, the run with its stops and its record."""
