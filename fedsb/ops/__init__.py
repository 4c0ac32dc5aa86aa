"""Running the apps: `fedsb run` (a local SuperLink and `flwr run`) and `fedsb deploy` (TLS, processes)."""
