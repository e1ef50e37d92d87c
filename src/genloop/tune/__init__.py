"""Hyperparameter studies (Optuna): ``genloop tune`` and :func:`tune`."""

from genloop.tune.study import TuneResult, tune
from genloop.tune.trial import TrialOutcome

__all__ = ["TrialOutcome", "TuneResult", "tune"]
