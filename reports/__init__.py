"""Reports: from a grid's runs (a tidy pandas frame) to the tables and figures of a paper.

``reports.load`` defines the frame, ``reports.tables`` and ``reports.stats`` compute numbers,
``reports.render`` and ``reports.figures`` turn them into Markdown/LaTeX/CSV and PNG, and
``reports.build.write_report`` writes all of it. Nothing here imports MLflow: the MLflow reader is
``harness/mlflow_io.py``. See ``reports/README.md``.
"""
from reports.build import write_report

__all__ = ["write_report"]
