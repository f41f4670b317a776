"""Search spaces: a small YAML schema, validated before anything starts, turned into Ray Tune.

A space file maps config keys (dotted, ``model.mask_ratio``, or nested under their section) to
either a fixed value or a distribution::

    preset: smoke                # optional starting config (see cbdtune.config.PRESETS)
    model.mask_ratio: {type: float, low: 0.3, high: 0.9}
    model.bernstein_order: {type: int, low: 1, high: 16}
    loss.gamma: {type: float, low: 0.05, high: 1.0, log: true}
    model.cim_activation: {type: categorical, choices: [sigmoid, relu_softshrink]}
    train.pretrain_epochs: 30    # fixed

Every bound and every choice is checked against :class:`~cbdtune.config.ExperimentConfig`, so a
space that could produce an invalid trial (``mask_ratio`` reaching 1, ``K < 1``, a negative loss
weight) is refused up front with the file and key in the message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from cbdtune.config import ConfigError, ExperimentConfig, field_type, load_yaml, preset

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_KINDS = ("float", "int", "categorical")
# The shipped spaces are package data (cbdtune/search_spaces/*.yaml), so an installed cbdtune
# finds them without a checkout; the repo's top-level search_spaces/ is a link to this folder.
_SHIPPED = "search_spaces"


@dataclass(frozen=True)
class Param:
    """One searched parameter."""

    key: str  # dotted config key
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """A validated space file: the config it starts from and the parameters it searches."""

    path: str
    base: ExperimentConfig  # preset + fixed values (dataset etc. are set later)
    params: tuple[Param, ...]
    sha256: str = ""

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def to_tune(self) -> dict[str, Any]:
        """``{dotted key: tune distribution}`` for the searched parameters."""
        from ray import tune

        out: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "categorical":
                out[p.key] = tune.choice(list(p.choices))
            elif p.kind == "float":
                out[p.key] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
            else:  # int: Tune's upper bound is exclusive
                low, high = int(p.low), int(p.high) + 1  # type: ignore[arg-type]
                out[p.key] = tune.lograndint(low, high) if p.log else tune.randint(low, high)
        return out

    def to_optuna(self) -> dict[str, Any]:
        """Optuna distributions (for importance analysis of finished trials)."""
        import optuna.distributions as od

        out: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "categorical":
                out[p.key] = od.CategoricalDistribution(list(p.choices))
            elif p.kind == "float":
                out[p.key] = od.FloatDistribution(p.low, p.high, log=p.log)  # type: ignore[arg-type]
            else:
                out[p.key] = od.IntDistribution(int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
        return out


def shipped_spaces() -> list[str]:
    """Names of the spaces that ship inside the package (``default``, ``paper``, ``smoke``...)."""
    folder = resources.files("cbdtune") / _SHIPPED
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir()
                  if f.name.endswith(".yaml"))


def resolve_path(space: str) -> Path | Traversable:
    """A path as given, else the shipped space of that name (``--space smoke``, ``smoke.yaml``).

    Raises:
        ConfigError: neither a file nor a shipped name; the message lists the shipped names.
    """
    path = Path(space)
    if path.is_file():
        return path
    folder = resources.files("cbdtune") / _SHIPPED
    for name in (space, f"{space}.yaml"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--space {space}: file not found; give a YAML path or one of: "
                      f"{', '.join(shipped_spaces())}")


def load_space(space: str) -> SearchSpace:
    """Read and validate a space file.

    Raises:
        ConfigError: bad YAML, an unknown key, a malformed distribution, low > high, or a bound or
            choice the config rejects; the message names the file and the key.
    """
    # as_file: the file itself for a normal install, a temporary copy for a zipped one.
    with resources.as_file(resolve_path(space)) as path:
        where = str(path)
        raw = load_yaml(path)
        text = path.read_bytes()
    preset_name = raw.pop("preset", "paper")
    if not isinstance(preset_name, str):
        raise ConfigError(f"{where}: preset: expected a name, but got {preset_name!r}")
    base = preset(preset_name)
    flat = _flatten(raw, where)
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for key, spec in flat.items():
        if "." not in key:
            raise ConfigError(f"{where}: {key}: unknown key; use section.field, e.g. "
                              "model.mask_ratio")
        try:
            field_type(key)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if isinstance(spec, dict):
            params.append(_param(key, spec, where))
        else:
            fixed[key] = spec
    if fixed:
        base = base.replace(fixed, where=where)
    for p in params:
        _check_against_config(base, p, where)
    return SearchSpace(path=where, base=base, params=tuple(params),
                       sha256=hashlib.sha256(text).hexdigest())


def _flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
        if "." not in key and isinstance(value, dict) and "type" not in value:
            for sub, spec in value.items():
                out[f"{key}.{sub}"] = spec
        else:
            out[key] = value
    return out


def _param(key: str, spec: dict[str, Any], where: str) -> Param:
    at = f"{where}: {key}"
    kind = spec.get("type")
    if kind not in _KINDS:
        raise ConfigError(f"{at}: type must be one of {list(_KINDS)}, but got {kind!r}")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{at}: unknown field {extra[0]!r} for a {kind}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}: categorical needs a non-empty list 'choices'")
        return Param(key, "categorical", choices=tuple(choices))
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at}: {name} must be a number, but got {value!r}")
        if kind == "int" and not float(value).is_integer():
            raise ConfigError(f"{at}: {name} must be an integer for type int, but got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log must be true or false, but got {log!r}")
    if low > high:
        raise ConfigError(f"{at}: low ({low}) must not exceed high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{at}: log scale needs low > 0, but got {low}")
    tp = field_type(key)
    numeric = {int, float} | {a for a in get_args(tp) if a in (int, float)}
    if get_origin(tp) is Literal or tp is bool or tp is str or not numeric & {int, float}:
        raise ConfigError(f"{at}: a {kind} range on a non-numeric field; use categorical")
    return Param(key, kind, low=float(low), high=float(high), log=log)


def _check_against_config(base: ExperimentConfig, p: Param, where: str) -> None:
    values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
    for value in values:
        if p.kind == "int":
            value = int(value)  # type: ignore[arg-type]
        try:
            base.replace({p.key: value}, where=where)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from the range of {p.key})") from None
