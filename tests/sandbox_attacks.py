"""Submission sources that probe or attack the sandbox, for the sandbox tests.

Each probe is Python code run when the submission is imported by ramp-test.
It is shipped base64-encoded and exec'd, as a participant who knows about
ramp-workflow's keyword filter would do (the filter is no defence). Results
are printed as one line ``PROBE <name> <json>`` to the run's log, where the
test reads them; the submission then trains a working model (or, with
``then_fail``, raises), so the run's end state is known.
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
from pathlib import Path

#: Helpers the probes use: ``attempt(name, fn)`` records ``"ok: <result>"`` or
#: ``"denied: <error>"`` under ``name``; ``report()`` prints them all.
PRELUDE = '''\
import json as _json, os as _os, sys as _sys
_results = {}

def attempt(name, fn):
    try:
        _results[name] = "ok: " + repr(fn())[:300]
    except BaseException as exc:
        _results[name] = "denied: " + type(exc).__name__ + ": " + str(exc)[:200]

def report(tag):
    print("PROBE " + tag + " " + _json.dumps(_results), flush=True)

def read(path):
    with _builtins_open(path, "rb") as f:
        return f.read(200)

def write(path, data=b"x"):
    with _builtins_open(path, "wb") as f:
        f.write(data)
    return "written"

import builtins as _b
_builtins_open = getattr(_b, "op" + "en")
listing = getattr(_os, "list" + "dir")
'''


def _wrap(code: str) -> str:
    return base64.b64encode((PRELUDE + textwrap.dedent(code)).encode()).decode()


def probe_classifier(code: str, good_source: str) -> str:
    """A tests/kit.py ``classifier.py``: runs ``code`` at import, then ``good_source``."""
    return f'exec(__import__("base64").b64decode("{_wrap(code)}"))\n' + good_source


def probe_estimator(code: str, good_source: str, in_fit: bool = False) -> str:
    """A demo kit ``estimator.py``: runs ``code`` at import (or in the first fit)."""
    if not in_fit:
        # ramp-test imports the submission once per fold: probe on the first only
        once = f'if not hasattr(__import__("builtins"), "_probed"):\n    __import__("builtins")._probed = 1\n    '
        return once + f'exec(__import__("base64").b64decode("{_wrap(code)}"))\n' + textwrap.dedent(good_source)
    return textwrap.dedent(good_source) + textwrap.dedent(f'''
        _payload = "{_wrap(code)}"
        _get = get_estimator

        def get_estimator():
            est = _get()
            _fit = est.fit

            def fit(*args, **kwargs):
                exec(__import__("base64").b64decode(_payload), {{}})
                return _fit(*args, **kwargs)

            est.fit = fit
            return est
        ''')


#: a demo kit ``estimator.py`` that always predicts the first class: about a
#: third right on iris
WEAK_ESTIMATOR = """\
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class Constant(ClassifierMixin, BaseEstimator):
    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        p = np.zeros((len(X), len(self.classes_)))
        p[:, 0] = 1.0
        return p

    def predict(self, X):
        return self.classes_[np.zeros(len(X), dtype=int)]


def get_estimator():
    return Constant()
"""

#: forges its scores both ways: rampwf's score functions patched to say
#: accuracy 1 and likelihood 0, and the ``scores.csv`` written so far rewritten
FORGER = """
    import glob, sys
    import rampwf.score_types.accuracy as acc
    acc.Accuracy.__call__ = lambda self, y_true, y_pred: 1.0
    import rampwf.score_types.negative_log_likelihood as nll
    nll.NegativeLogLikelihood.__call__ = lambda self, y_true, y_pred: 0.0
    out = [a for a in sys.argv if a.endswith("submissions")][0]
    me = [a for a in sys.argv if a.startswith("submission_")][0]
    def overwrite():
        done = []
        for path in glob.glob(_os.path.join(out, me, "training_output", "fold_*", "scores.csv")):
            write(path, b"step,acc,nll,time\\ntrain,1.0,0.0,1\\nvalid,1.0,0.0,1\\ntest,1.0,0.0,1\\n")
            done.append(path)
        return done
    attempt("overwrite_scores", overwrite)
    report("forger")
"""


def forging_estimator() -> str:
    """A demo kit ``estimator.py``: a weak model whose every fit forges (:data:`FORGER`)."""
    return probe_estimator(FORGER, WEAK_ESTIMATOR, in_fit=True)


def probe_results(log_text: str, tag: str) -> dict[str, str]:
    """The last ``PROBE <tag>`` record in a log (a run prints one per fold)."""
    found = re.findall(rf"^PROBE {re.escape(tag)} (.*)$", log_text, re.M)
    assert found, f"no PROBE {tag} line in the log:\n{log_text[-3000:]}"
    return json.loads(found[-1])


def denied(results: dict[str, str], name: str) -> bool:
    return results.get(name, "").startswith("denied")


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below root (a folder: its presence), links
    not followed, ``skip`` trees and ``ramp.sqlite*`` (the database) left out."""
    out = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip) or path.name.startswith("ramp.sqlite"):
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        out[str(path.relative_to(root))] = (0, 0) if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out
