"""The classifier stages, found by name: one registry of name -> stage class.

A stage is one file under ``cbdtune/stages/`` with a :class:`cbdtune.stages.base.Stage` subclass
(what it reads from the encoder, how it fits on the folds and refits, the head it builds for
serving), plus one :func:`register` line below. ``train.classifier`` names a stage (or
:data:`BOTH`), ``train.probe`` a stage's probe name; ``tests/test_stages.py`` checks that the
config's choices and this registry agree.

This module imports nothing heavy (no torch): :mod:`cbdtune.reports` and the search read the
names and facts here before Ray starts; :func:`get` imports a stage's module on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cbdtune.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from cbdtune.stages.base import Stage

BOTH = "both"  # train.classifier: linear_probe, then fine_tune (BOTH_STAGES)


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name (the report's ``stage``), where its class is, and what the
    search must know of it without importing torch."""

    name: str
    target: str  # "module:Class"
    closed_form: bool = False  # fits a path in closed form: one epoch report, not one per epoch
    probe: str = ""  # its name as a fidelity probe (train.probe), "" if it is not one


_REGISTRY: dict[str, StageSpec] = {}


def register(name: str, target: str, *, closed_form: bool = False, probe: str = "") -> None:
    """Add a stage; the order of registration is the order in which stages run."""
    if name in _REGISTRY or name == BOTH:
        raise ValueError(f"stage {name!r} is already registered")
    _REGISTRY[name] = StageSpec(name, target, closed_form, probe)


RIDGE = "ridge"
LINEAR_PROBE = "linear_probe"
FINE_TUNE = "fine_tune"
register(RIDGE, "cbdtune.stages.ridge:Ridge", closed_form=True, probe="ridge")
register(LINEAR_PROBE, "cbdtune.stages.linear_probe:LinearProbe", probe="linear")
register(FINE_TUNE, "cbdtune.stages.fine_tune:FineTune")
BOTH_STAGES = (LINEAR_PROBE, FINE_TUNE)  # what BOTH runs, in order


def names() -> tuple[str, ...]:
    """Every registered stage, in the order they run."""
    return tuple(_REGISTRY)


def spec(name: str) -> StageSpec:
    """The registration of ``name``.

    Raises:
        ConfigError: no stage of that name is registered.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"classifier stage {name!r}: not registered; expected one of "
                          f"{', '.join(_REGISTRY)}") from None


def get(name: str) -> Stage:
    """The stage ``name`` (its class imported on first use, then an instance)."""
    module, cls = spec(name).target.split(":")
    return getattr(importlib.import_module(module), cls)()


def probe_stage(probe: str) -> str:
    """The stage a fidelity probe ``train.probe`` runs (``"linear"`` -> ``"linear_probe"``)."""
    found = [s.name for s in _REGISTRY.values() if s.probe == probe]
    if not found:
        raise ConfigError(f"train.probe {probe!r}: no stage probes by that name; expected one "
                          f"of {', '.join(s.probe for s in _REGISTRY.values() if s.probe)}")
    return found[0]


def selected(tc: TrainConfig) -> Iterator[str]:
    """The stages ``tc.classifier`` runs, in registration order."""
    chosen = BOTH_STAGES if tc.classifier == BOTH else (spec(tc.classifier).name,)
    yield from (name for name in _REGISTRY if name in chosen)


def epoch_reports(tc: TrainConfig, name: str) -> int:
    """Epoch reports a stage makes at most: a closed-form stage reports its selected point
    once, the others once per classifier epoch."""
    return 1 if spec(name).closed_form else tc.classifier_epochs
