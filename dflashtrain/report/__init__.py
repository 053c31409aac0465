"""Comparing runs: `dflashtrain-report` and the report at the end of every multirun (docs/report.md).

jobs.py      a run's own status.json, and where a sweep job's DDP ranks run (imported by training: light)
runs.py      finding runs in sweep directories; reading overrides, status and logged scalars
tau.py       real τ of a run's last checkpoint, by the dflashtrain-eval recipe
table.py     rows, winners, mean ± std over seeds; Markdown and CSV
plots.py     PNG curves against step (matplotlib, Agg)
app.py       make_report and the dflashtrain-report command line
callback.py  the Hydra callback (hydra.callbacks.report in conf/train.yaml)
"""
