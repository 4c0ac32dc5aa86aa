"""`fedsb plot DIR`: figures and a report.md for a sweep directory or a run directory, one module per
concern.

Accuracy: every run evaluates each round on a validation split; the round with the best
validation accuracy is chosen, and the test split at that round (`test_accuracy`) is the number
reported (`final_test_accuracy`: the test split after the last round). The sweep figures and the
frontier use `test_accuracy` unless --metric says final_test_accuracy.

- data: reading run directories (through fedsb.experiment.summary's schema) and sweep
  directories; settings (a sweep's completed cells grouped over seeds).
- style: the palette, markers per method (by registry index), line styles, axes helpers.
- comm: comm_vs_accuracy and its Pareto frontier (sweeps only).
- privacy: privacy_vs_utility (sweeps with a private run).
- rounds: accuracy_vs_round and bytes_vs_round.
- components: bytes_by_component.
- report: report.md.
- cli: plot_dir (figures as PNG and SVG in DIR/report/ unless --out says otherwise) and the
  `fedsb plot` subcommand.

Where a setting has several seeds, markers and lines are the mean over seeds, and bars or bands
span the minimum to the maximum.

A tuned sweep (the sweep file's `tune`, recorded in <sweep dir>/sweep.json) is reported per group
at the value chosen on validation (fedsb.analysis.sweep.tuning.tune_results, as in tuned.csv):
report.md starts with that table and the values tried per group; comm_vs_accuracy has one marker
per group at (mean bytes, mean test accuracy) with error bars of ± one sample standard deviation
over seeds, the frontier over the federated groups and each centralised reference as a horizontal
line; the other figures show the chosen settings only.

Every figure function returns a matplotlib Figure (built without pyplot), so tests can inspect the
artists: data series carry gid "series", spread bands "spread", reference lines "reference" and the
Pareto frontier "frontier".
"""
