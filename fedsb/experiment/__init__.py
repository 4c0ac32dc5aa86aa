"""One experiment: its config, the per-process Worker, the meter and the run directory."""
