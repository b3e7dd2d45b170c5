"""``klayer diagnose``: which batch-norm gradients are wrong, and which classic bug most
likely made them so.

    from klayer import diagnose
    case = diagnose.make_case(layout="rows")          # or a path to a case file
    d = diagnose.check(case, {"W1": ..., "b1": ...})  # or a path to a .npz/.mat file
    d.verdict, d.likely, d.tensors

See docs/diagnose.md for the catalogue and docs/batchnorm-backward.md for the derivation.
"""

from klayer.diagnose.bugs import ANALYTIC, BUGS, CATALOGUE, NUMERICAL, planted_gradients
from klayer.diagnose.case import Case, case_arrays, case_from_arrays, from_core, make_case
from klayer.diagnose.check import Diagnosis, check

__all__ = ["ANALYTIC", "BUGS", "CATALOGUE", "NUMERICAL", "Case", "Diagnosis", "case_arrays",
           "case_from_arrays", "check", "from_core", "make_case", "planted_gradients"]
