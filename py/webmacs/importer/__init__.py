"""History imports: a WebMACS database (`webmacs import webmacs`) and CSV/Parquet files (`webmacs import csv|parquet`).

One module per job: `source` reads a WebMACS database (its schema, its datapoints' problems, the COPY that
streams them), `relational` maps its users, events, experiments … onto our tables keeping every public id,
`datapoints` streams the datapoints into the hypertable with a resumable checkpoint, `run` puts the phases
together (lock, resume, dry run), `files` reads CSV and Parquet, `report` says what happened.
`webmacs.cli_import` is the command line.
"""
