"""`fedsb sweep SWEEP.yaml`: a grid of real simulations on top of one base config, one module per concern.

- spec: the sweep file (base, output_dir, set, grid with plain and linked axes, tune), its cells,
  and sweep.json, which pins the settings every cell shares to the sweep directory.
- table: sweep.csv, one row per finished cell (grid values, status and error, accuracy, bytes by
  component, privacy spent, wall time, run directory).
- outputs: a cell's row from its config and its run's outputs (read through
  fedsb.experiment.summary's schema).
- tuning: per group of cells, the value of a key chosen on validation (successive halving over
  seeds), and tuned.csv.
- runner: running the cells not yet completed, resumably.
- report: the lines `fedsb sweep` prints about results.
- cli: the `fedsb sweep` subcommand.

Nothing here imports torch (a run does, through fedsb.ops.launch, only when cells run): `fedsb plot`
and the tests read sweeps without it.
"""
