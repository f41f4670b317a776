"""What one search is asked to do: :class:`SearchSettings`, typed and validated once.

``python -m cbdtune.search`` maps its flags onto a :class:`SearchSettings` and calls
:func:`cbdtune.search.run_search`; Python code builds one directly::

    from cbdtune.search import SearchSettings, run_search
    result = run_search(SearchSettings(datasets=("gesture",), space="smoke", num_samples=4))
    result.best_trial, result.best_value, result.trials

Every field is keyword-only; lists are tuples (``datasets``, ``metrics``, ``modes``): only the
command line splits ``gesture,awr`` into ``("gesture", "awr")`` (:meth:`SearchSettings.from_args`).
Every value is checked in ``__post_init__``, before anything is loaded or started; a bad one raises
:class:`~cbdtune.config.ConfigError` with one line naming the field and its flag. The dataset,
space, MLflow store and storage are checked by the search itself (they need files or servers).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, get_args, get_type_hints

from cbdtune import reports
from cbdtune.config import METRIC, MODE, ConfigError, _coerce

Sampler = Literal["tpe", "random", "cmaes", "grid"]  # Optuna's samplers, seeded
Scheduler = Literal["asha", "none"]
# What the search hands over: ensemble selection over every completed trial and a MiniRocket
# baseline (cbdtune.handover), or the top --refit-top configurations with equal weights.
Ensemble = Literal["select", "top"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)

# Tune fills it in every result; a 2nd objective only.
COSTS: tuple[str, ...] = (reports.TIME_TOTAL_S,)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# The tuple fields and the flag each is given by on the command line, comma-separated.
LIST_FLAGS = {"datasets": "dataset", "metrics": "metric", "modes": "mode"}


def parse_duration(text: str, *, flag: str = "--time-budget") -> float:
    """``"90m"`` -> 5400.0: a positive number with an optional unit s, m, h or d (seconds).

    Raises:
        ConfigError: anything else (``nan``, ``-5m``, ``1h30``, ``2 hours``).
    """
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)", str(text).strip().lower())
    seconds = float(m.group(1)) * _SECONDS[m.group(2)] if m else 0.0
    if not seconds > 0:
        raise ConfigError(f"{flag} {text}: expected a positive duration such as 90m, 2h or "
                          "3600s")
    return seconds


def flag(name: str) -> str:
    """``num_samples`` -> ``--num-samples``; ``datasets`` -> ``--dataset`` (:data:`LIST_FLAGS`)."""
    return "--" + LIST_FLAGS.get(name, name).replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """One search. Defaults are the CLI's; ``None`` means "decided by the search" as noted."""

    # Registry names (gesture, awr, ...), UEA/UCR archive names or folders: one configuration
    # searched on every one. A single str is one name.
    datasets: tuple[str, ...]
    space: str = "default"  # a YAML path or a shipped space name (default, paper, smoke)
    data_dir: str | None = None  # None: $CBDTUNE_DATA_DIR, then the cache
    seed: int | None = None  # train.seed; None: the space's (0)
    num_samples: int = 16
    max_concurrent: int = 0  # 0: as many trials as the cluster's CPUs/GPUs fit
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions (0.25) let trials share a GPU
    sampler: Sampler = "tpe"
    scheduler: Scheduler | None = None  # None: asha for one dataset, none for several
    # One selection metric, or two (Optuna's multi-objective search): the second may also be a
    # cost Tune records for every trial (COSTS). Trials are ranked, stopped by ASHA and refitted
    # on the first; the summary lists the Pareto front of both.
    metrics: tuple[str, ...] = (METRIC,)
    # max or min per metric; () (the default): min for losses and costs, else max
    modes: tuple[str, ...] = ()
    mlflow_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str | None = None  # None: cbdtune-<dataset>
    name: str | None = None  # None: <dataset>-<space stem>; -2, -3... when taken
    storage: str | None = None  # Ray storage: a folder or s3:// / gs:// URI; None: ~/ray_results
    results_dir: str = "results"
    address: str | None = None  # a Ray cluster; None: $RAY_ADDRESS, else a new local Ray
    resume: bool = False
    overwrite: bool = False
    cv_folds: int | None = None  # None: the space's (5); 0: one validation split
    cv_repeats: int | None = None  # None: the space's (1)
    refit_top: int = 3  # 0: no refit, no model
    refit_seeds: int = 3
    ensemble: Ensemble = "select"  # how the refit configurations are chosen (Ensemble above)
    baseline: bool = True  # the paper's configuration as trial 0
    max_failures: int = 2  # retries of a trial (and of its worker group) after a failure
    allow_autoscale: bool = False
    time_budget: str | None = None  # "90m", "2h", "3600s"
    verbose: bool = False
    # Encoder reuse across trials (issue 15) is switched here: the flag that turns it off maps
    # onto this field, and the search hands it to the trials through the worker's TrialSettings.
    reuse: bool = True
    encoder_cache: str | None = None  # the cache root (entries in <root>/encoders); None: --storage
    reuse_share: float = 0.5  # the most trials the searcher proposes on a known encoder

    def __post_init__(self) -> None:
        hints = get_type_hints(SearchSettings)
        for f in fields(self):  # types first (int -> float allowed), as ExperimentConfig does
            value = getattr(self, f.name)
            if f.name in LIST_FLAGS:
                value = _names(value, f.name)
            else:
                value = _coerce(value, hints[f.name], _where(f.name))
            object.__setattr__(self, f.name, value)
        self._check_datasets()
        self._check_metrics()
        self._check_modes()
        self._check_counts()
        self._check_resources()
        if self.time_budget is not None:
            parse_duration(self.time_budget, flag=f"time_budget ({flag('time_budget')})")
        if not (math.isfinite(self.reuse_share) and 0.0 <= self.reuse_share <= 1.0):
            raise ConfigError(f"{_where('reuse_share')}: expected a share in [0, 1], but got "
                              f"{self.reuse_share}")

    def _check_datasets(self) -> None:
        """Every name non-empty and given once; the scheduler resolved (a multi-dataset trial
        reports once, at its end: ASHA would have no rung to compare)."""
        names = self.datasets
        if not any(names):
            raise ConfigError(f"{_where('datasets')}: must not be empty; give a name such as "
                              "gesture or a folder")
        if not all(names):
            raise ConfigError(f"{_where('datasets')} {','.join(names)}: an empty name in the "
                              "list; separate names with single commas, e.g. gesture,awr,fm")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{_where('datasets')} {','.join(names)}: {', '.join(twice)} "
                              "given more than once; name each dataset once")
        if self.scheduler is None:
            object.__setattr__(self, "scheduler", self._own_scheduler)
        elif self.scheduler == "asha" and len(names) > 1:
            raise ConfigError(f"{_where('scheduler')} asha: a multi-dataset trial reports once, "
                              "after every dataset ran, so ASHA has nothing to compare; drop "
                              "--scheduler (none is the default for several datasets)")

    @property
    def _own_scheduler(self) -> str:
        return "asha" if len(self.datasets) == 1 else "none"

    def _check_metrics(self) -> None:
        names = self.metrics
        if not 1 <= len(names) <= 2 or not all(names):
            raise ConfigError(f"{_where('metrics')} {','.join(names)}: expected one metric or "
                              f"two, e.g. {METRIC},{COSTS[0]}")
        for i, name in enumerate(names):
            if name.startswith("test"):
                raise ConfigError(f"{_where('metrics')} {name}: the search never selects on a "
                                  f"test metric; use a validation metric such as {METRIC}")
            allowed = reports.SELECTION_METRICS + (COSTS if i else ())
            if name not in allowed:
                raise ConfigError(f"{_where('metrics')} {name}: not a metric the pipeline "
                                  f"reports for selection{' or a cost' if i else ''}; choose "
                                  f"one of {', '.join(allowed)}"
                                  + ("" if i else f" ({', '.join(COSTS)} only as the second)"))
        if len(names) == 2 and names[0] == names[1]:
            raise ConfigError(f"{_where('metrics')} {','.join(names)}: the two objectives are "
                              "the same metric; give two different ones")
        if len(names) == 2 and self.sampler == "cmaes":
            raise ConfigError(f"{_where('sampler')} cmaes: Optuna's CMA-ES is single-objective; "
                              f"use tpe, random or grid with --metric {','.join(names)}")

    def _check_modes(self) -> None:
        """One direction per metric: given (``("max", "min")``) or each metric's own."""
        if not self.modes:
            object.__setattr__(self, "modes", tuple(map(own_mode, self.metrics)))
            return
        if not all(m in ("max", "min") for m in self.modes):
            raise ConfigError(f"{_where('modes')}: expected one of max, min for each metric, "
                              f"but got {','.join(self.modes)}")
        if len(self.modes) != len(self.metrics):
            raise ConfigError(f"{_where('modes')} {','.join(self.modes)}: {len(self.modes)} "
                              f"direction(s) for {len(self.metrics)} metric(s) "
                              f"({','.join(self.metrics)}); give one per metric, e.g. max,min")

    def _check_counts(self) -> None:
        for name, least in (("num_samples", 1), ("workers_per_trial", 1),
                            ("max_concurrent", 0), ("max_failures", 0), ("refit_top", 0),
                            ("refit_seeds", 1), ("seed", 0), ("cv_repeats", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"{_where(name)}: must be >= {least}, but got {value}")
        if self.cv_folds is not None and self.cv_folds != 0 and self.cv_folds < 2:
            raise ConfigError(f"{_where('cv_folds')}: must be 0 (one validation split) or >= 2, "
                              f"but got {self.cv_folds}")

    def _check_resources(self) -> None:
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ConfigError(f"{_where('cpus_per_worker')}: must be a finite number > 0, but "
                              f"got {self.cpus_per_worker}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise ConfigError(f"{_where('gpus_per_worker')}: must be a finite number >= 0, but "
                              f"got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            raise ConfigError(f"{_where('gpus_per_worker')} {self.gpus_per_worker}: fractions "
                              "must be < 1 (a worker shares one GPU) or whole numbers")

    @property
    def time_budget_s(self) -> float | None:
        """The time budget in seconds (None: no budget)."""
        return parse_duration(self.time_budget) if self.time_budget is not None else None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (``datasets`` has none)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def cli_defaults(cls) -> dict[str, Any]:
        """The search CLI's defaults: :meth:`defaults` under the flags' names, tuples joined."""
        out = {}
        for name, value in cls.defaults().items():
            if name in LIST_FLAGS:
                name, value = LIST_FLAGS[name], ",".join(value) or None
            out[name] = value
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SearchSettings:
        """The search CLI's parsed flags (``cbdtune.search.parser``) as settings: a flag of the
        same name as a field, ``--no-<field>`` for a switch that defaults to on, and the
        comma-separated ``--dataset``, ``--metric`` and ``--mode`` split into tuples."""
        given = vars(args)
        kwargs: dict[str, Any] = {f.name: given[f.name] for f in fields(cls) if f.name in given}
        for name, cli_name in LIST_FLAGS.items():
            text = given.get(cli_name)
            if text is not None:
                kwargs[name] = tuple(n.strip() for n in str(text).split(","))
        for f in fields(cls):
            if f.default is True and given.get(f"no_{f.name}"):
                kwargs[f.name] = False
        return cls(**kwargs)

    def to_argv(self) -> list[str]:
        """The flags of the search CLI that give these settings (the fields that differ from
        their defaults; ``--mode`` when it differs from the metrics' own directions)."""
        argv = ["--dataset", ",".join(self.datasets)]
        own_modes = tuple(map(own_mode, self.metrics))
        for name, default in self.defaults().items():
            value = getattr(self, name)
            if value == default or (name == "modes" and value == own_modes) or (
                    name == "scheduler" and value == self._own_scheduler):
                continue
            if value is True:
                argv.append(flag(name))
            elif value is False:
                argv.append(f"--no-{name.replace('_', '-')}")
            elif isinstance(value, tuple):
                argv += [flag(name), ",".join(value)]
            else:
                argv += [flag(name), str(value)]
        return argv


def own_mode(metric: str) -> str:
    """A metric's own direction: min for a loss or a cost, else max."""
    return "min" if "loss" in metric or metric in COSTS else MODE


def _names(value: Any, name: str) -> tuple[str, ...]:
    """A tuple field's value: a tuple (or list) of strings, each stripped; a single str is one
    name. Commas are the command line's to split, not this class's."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{_where(name)}: expected a tuple of strings, but got {value!r}")
    items = tuple(v.strip() for v in items)
    if any("," in v for v in items):
        raise ConfigError(f"{_where(name)} {value!r}: one name per item, e.g. "
                          f"{name}=(\"a\", \"b\"); only the command line splits commas")
    return items


def _where(name: str) -> str:
    """How an error names a field: ``num_samples (--num-samples)``."""
    return f"{name} ({flag(name)})"


__all__ = ["COSTS", "LIST_FLAGS", "SAMPLERS", "SCHEDULERS", "SearchSettings", "flag", "own_mode",
           "parse_duration"]
