"""The data layer: schema (the text/label contract), synthetic (the generated classification task),
arithmetic (the generated instruction task), sources (local files, the hub, labels, `load_task`),
partition (client partitions, label counts, the partition plot), templates (prompt formats of
instruction tuning) and tokens (tokenisation, its cache, batches)."""
