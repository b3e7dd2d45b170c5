"""The batch-norm study that ``klayer reproduce`` runs: its sections as data
(:mod:`klayer.study.sections`), the ``--extended`` section
(:mod:`klayer.study.extended`) and REPORT.md written from the numbers
(:mod:`klayer.study.report`)."""
