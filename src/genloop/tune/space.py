"""The search space: ``tune.space`` as Optuna distributions, and its sampler and pruner.

    tune.space           → make_distributions (float, int, categorical; log, step)
    tune.sampler         → make_sampler (tpe, random, cmaes; grid: every point queued once)
    tune.pruner          → make_pruner, in the unit trials report: optimizer steps

:func:`check_space` refuses, before any trial runs, what cannot vary between trials (the
dataset is prepared once for the whole study) and a grid that is not one.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from genloop.config import (
    CategoricalParam,
    FloatParam,
    GenloopConfig,
    IntParam,
    ParamSpec,
    TuneConfig,
)
from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    import optuna

# keys a trial may not change: the dataset is prepared once and pinned for the study
FROZEN_PREFIXES = ("data.", "workspace.", "tune.", "name")


def check_space(t: TuneConfig, enqueue: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a space (or enqueued parameters) the study cannot run, before it starts."""
    for key in t.space:
        frozen = key.startswith(FROZEN_PREFIXES) or (
            key.startswith("tokenizer.") and key != "tokenizer.seq_len"
        )
        if frozen:
            raise ConfigError(
                f"tune.space key {key!r} cannot vary between trials: the dataset (data, "
                "tokenizer) is prepared once for the whole study"
            )
    if t.sampler == "grid":
        _grid(t)  # a float without a step is an error there
    if t.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise GenloopError("tune.sampler 'cmaes' needs the cmaes package (pip install cmaes)")
    for params in enqueue:
        unknown = sorted(set(params) - set(t.space))
        if unknown:
            raise ConfigError(
                f"enqueued parameter {unknown[0]!r} is not in tune.space "
                f"(keys: {', '.join(t.space)})"
            )


def make_sampler(t: TuneConfig, seed: int, budget: int) -> optuna.samplers.BaseSampler:
    import optuna

    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "grid":  # the points are queued when the study is made (grid_points)
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # TPE: a few random trials first (a quarter of the budget, 2 to 10), then the model;
    # the constant liar keeps parallel workers from sampling the same point
    startup = min(10, max(2, budget // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def make_pruner(t: TuneConfig, cfg: GenloopConfig, budget: int) -> optuna.pruners.BasePruner:
    """The pruner, in the unit the trials report: optimizer steps (one report per
    validation, every ``train.eval_every`` steps)."""
    import optuna

    every, steps = cfg.train.eval_every, cfg.train.max_steps
    if t.pruner == "none":
        return optuna.pruners.NopPruner()
    if t.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=every, reduction_factor=3)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=every, max_resource=max(steps, every), reduction_factor=3
        )
    # median: once a few trials have finished (a quarter of the budget, 1 to 5), stop a
    # trial whose value at a validation is worse than the median of the others' there
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, budget // 4)))


def make_distributions(
    space: Mapping[str, ParamSpec],
) -> dict[str, optuna.distributions.BaseDistribution]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, spec in space.items():
        if isinstance(spec, FloatParam):
            out[key] = FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        elif isinstance(spec, IntParam):
            out[key] = IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        else:
            out[key] = CategoricalDistribution(spec.choices)
    return out


def _grid(t: TuneConfig) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for key, spec in t.space.items():
        if isinstance(spec, CategoricalParam):
            grid[key] = list(spec.choices)
        elif isinstance(spec, IntParam):
            grid[key] = list(range(spec.low, spec.high + 1, spec.step))
        elif spec.step is not None:
            n = math.floor((spec.high - spec.low) / spec.step + 1e-9) + 1
            grid[key] = [round(spec.low + i * spec.step, 12) for i in range(n)]
        else:
            raise ConfigError(
                f"the grid sampler needs a step for float parameter {key!r} "
                "(or make it categorical)"
            )
    return grid


def grid_points(t: TuneConfig) -> list[dict[str, Any]]:
    grid = _grid(t)
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def grid_size(t: TuneConfig) -> int | None:
    if t.sampler != "grid":
        return None
    return math.prod(len(v) for v in _grid(t).values())
