"""Hyperparameter studies (Optuna): ``genloop tune`` and :func:`tune`."""

from genloop.tune.study import TrialOutcome, TuneResult, tune

__all__ = ["TrialOutcome", "TuneResult", "tune"]
