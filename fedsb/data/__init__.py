"""The data layer: sources (files, the hub), the generated task, partitioning, tokenisation."""
