"""The run report: the self-contained ``report.html`` and every plot."""
