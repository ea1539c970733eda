"""Hyper-parameter search: scikit-learn's ``n_jobs`` on vmexec through joblib.

scikit-learn parallelises with joblib; ``import vmexec.joblib`` registers a joblib
backend named "vmexec", so the fits of a ``GridSearchCV`` run on vmexec machines
without changing the estimator code. Needs scikit-learn::

    pip install 'vmexec[joblib]' scikit-learn
    python examples/hyperparameter_search.py

Two ways to choose the fleet:

* ``parallel_config(backend="vmexec", n_jobs=2, provider=...)`` — a fleet is made
  for each parallel call (sized by ``n_jobs``) and removed when the call returns;
* ``parallel_config(backend="vmexec", executor=ex)`` — your ``VMExecutor``, kept
  across several calls (one boot for a search and its cross-validation).
"""

from __future__ import annotations

import os
import sys
import time

try:
    from joblib import parallel_config
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
    from sklearn.svm import SVC
except ImportError as exc:
    sys.exit(f"this example needs scikit-learn ({exc.name} is missing): "
             "pip install 'vmexec[joblib]' scikit-learn")

import vmexec.joblib  # noqa: F401  (registers joblib's "vmexec" backend)
from vmexec import VMExecutor


# Task slots. Small so that the example is quick on a laptop; on a cloud fleet raise
# it (and the grid) freely.
SLOTS = 2


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25,
                                                        random_state=0)
    grid = {"C": [1, 10, 100], "gamma": [1e-4, 1e-3, 1e-2]}

    # 1. One search: the backend makes a fleet of n_jobs slots and removes it after.
    started = time.perf_counter()
    with parallel_config(backend="vmexec", n_jobs=SLOTS, provider=provider):
        search = GridSearchCV(SVC(), grid, cv=3).fit(X_train, y_train)
    print(f"grid search: {len(search.cv_results_['params'])} candidates x 3 folds in "
          f"{time.perf_counter() - started:.1f}s")
    print(f"best {search.best_params_}, cv accuracy {search.best_score_:.3f}, "
          f"test accuracy {search.score(X_test, y_test):.3f}")

    # 2. Several calls on one fleet: n_jobs=-1 means every slot of the executor.
    with VMExecutor(max_workers=SLOTS, provider=provider) as ex:
        with parallel_config(backend="vmexec", executor=ex):
            scores = cross_val_score(search.best_estimator_, X, y, cv=5, n_jobs=-1)
            refined = GridSearchCV(SVC(), {"C": [0.5, 1, 2], "gamma": [5e-4, 1e-3]},
                                   cv=3, n_jobs=-1).fit(X_train, y_train)
    print(f"5-fold accuracy of the best model: {scores.mean():.3f} +/- {scores.std():.3f}")
    print(f"refined search: best {refined.best_params_}, cv accuracy "
          f"{refined.best_score_:.3f}")


if __name__ == "__main__":
    main()
