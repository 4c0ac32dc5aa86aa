"""Sweeps, plots and reports over run directories; importable without torch."""
