"""The data layer: schema (the text/label contract), synthetic (the generated task), sources
(local files, the hub, labels, `load_task`), partition (client partitions, label counts, the
partition plot) and tokens (tokenisation, its cache, batches)."""
