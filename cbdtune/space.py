"""Search spaces: a small YAML schema, validated before anything starts, sampled by Optuna.

A space file maps config keys (dotted, ``model.mask_ratio``, or nested under their section) to
either a fixed value or a distribution::

    preset: smoke                # optional starting config (see cbdtune.config.PRESETS)
    train.pretrain_epochs: 30    # fixed
    model.mask_ratio: {type: float, low: 0.3, high: 0.9}
    model.use_cbd: {type: categorical, choices: [true, false]}
    model.bernstein_order: {type: int, low: 1, high: 16, when: {model.use_cbd: true}}
    loss.gamma: {type: float, low: 0.05, high: 1.0, log: true, when: {model.use_cbd: true}}
    model.cim_activation: {type: categorical, choices: [sigmoid, relu_softshrink],
                           when: {model.use_cbd: true, model.use_cim: [true]}}

``when`` makes a parameter conditional: it is sampled only when every listed key has one of the
listed values (a single value or a list). A key in ``when`` is either a parameter searched
*earlier* in the file (its sampled value; a parameter that was itself skipped satisfies no
condition, so a chain switches off as a whole) or a fixed key (its value in the space's base
config: the preset plus the file's fixed keys). A skipped parameter keeps its base value in the
trial, is absent from Optuna's trial and from ``trials.parquet`` (NaN), and gets no importance.

Every bound, choice and condition value is checked against
:class:`~cbdtune.config.ExperimentConfig`, so a space that could produce an invalid trial
(``mask_ratio`` reaching 1, ``K < 1``, a negative loss weight) or a condition that can never
match is refused up front with the file and key in the message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from cbdtune.config import ConfigError, ExperimentConfig, field_type, load_yaml, preset

if TYPE_CHECKING:
    import sys

    import optuna

    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:  # Python 3.10 has it here only
        from importlib.abc import Traversable

_KINDS = ("float", "int", "categorical")
# The shipped spaces are package data (cbdtune/search_spaces/*.yaml), so an installed cbdtune
# finds them without a checkout; the repo's top-level search_spaces/ is a link to this folder.
_SHIPPED = "search_spaces"
# Optuna parameter names: Ray's OptunaSearch.suggest unflattens them on "/", so a trial's config
# is {"train_loop_config": {dotted key: value}} (ray/tune/search/optuna/optuna_search.py).
OPTUNA_PREFIX = "train_loop_config/"

Condition = tuple[str, tuple[Any, ...]]  # (other dotted key, the values that switch this one on)


@dataclass(frozen=True)
class Param:
    """One searched parameter."""

    key: str  # dotted config key
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: tuple[Condition, ...] = ()  # all must hold for the parameter to be sampled

    @property
    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of a float or int parameter."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.key}: a {self.kind} parameter has no range")
        return self.low, self.high


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

    def active(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``values`` (one per searched key) whose ``when`` holds, in file order.

        What :meth:`define_by_run` would sample if Optuna proposed ``values``.
        """
        fixed = self.base.to_dict()
        out: dict[str, Any] = {}
        for p in self.params:
            if _holds(p.when, out, fixed, self.keys):
                out[p.key] = values[p.key]
        return out

    def optuna_point(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`active` keyed by Optuna name: a point for ``points_to_evaluate``, which Ray
        passes to ``Study.enqueue_trial`` to fix exactly these parameters in one trial."""
        return {OPTUNA_PREFIX + k: v for k, v in self.active(values).items()}

    def grid(self) -> dict[str, list[Any]]:
        """Every value of every parameter, by Optuna name: the ``GridSampler``'s search space.

        Raises:
            ConfigError: a float range (no grid) or a conditional parameter (a grid point would
                name a value that is never sampled).
        """
        out: dict[str, list[Any]] = {}
        for p in self.params:
            if p.kind == "float" or p.when:
                raise ConfigError(f"{self.path}: {p.key}: --sampler grid needs categorical or int "
                                  "parameters without 'when'; use tpe or random for this space")
            out[OPTUNA_PREFIX + p.key] = (list(p.choices) if p.kind == "categorical"
                                          else list(range(int(p.bounds[0]), int(p.bounds[1]) + 1)))
        return out

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """Sample the parameters whose ``when`` holds, in file order: ``OptunaSearch(space=...)``.

        Each is suggested as ``train_loop_config/<dotted key>``, which Ray unflattens to
        ``{"train_loop_config": {dotted key: value}}``; a skipped one is never suggested.

        Args:
            trial: an Optuna trial (Ray passes a wrapper that records every suggestion).

        Returns:
            None: the suggestions are the whole trial config.
        """
        fixed: dict[str, Any] = self.base.to_dict()
        sampled: dict[str, Any] = {}
        for p in self.params:
            if _holds(p.when, sampled, fixed, self.keys):
                sampled[p.key] = _suggest(trial, p)
        return None

    def to_optuna(self) -> dict[str, Any]:
        """Optuna distributions (for importance analysis of finished trials)."""
        import optuna.distributions as od

        out: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "categorical":
                out[p.key] = od.CategoricalDistribution(list(p.choices))
            elif p.kind == "float":
                out[p.key] = od.FloatDistribution(*p.bounds, log=p.log)
            else:
                low, high = p.bounds
                out[p.key] = od.IntDistribution(int(low), int(high), log=p.log)
        return out


def _suggest(trial: optuna.Trial, p: Param) -> Any:
    name = OPTUNA_PREFIX + p.key
    if p.kind == "categorical":
        return trial.suggest_categorical(name, list(p.choices))
    if p.kind == "float":
        return trial.suggest_float(name, *p.bounds, log=p.log)
    low, high = p.bounds
    return trial.suggest_int(name, int(low), int(high), log=p.log)


def _holds(when: tuple[Condition, ...], sampled: Mapping[str, Any], fixed: Mapping[str, Any],
           searched: list[str]) -> bool:
    """Every condition holds: a searched key by its sampled value (none if it was skipped), a
    fixed key by its base value."""
    for key, values in when:
        if key in searched and key not in sampled:
            return False
        value = sampled[key] if key in searched else fixed[key]
        if not any(_same(value, v) for v in values):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    """``a == b`` except that a bool never equals a number (YAML ``true`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


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
        ConfigError: bad YAML, an unknown key, a malformed distribution, low > high, a float range
            on an integer key, a bound or choice the config rejects, or a ``when`` on an unknown
            key, on a key searched later, or on a value that key never takes; the message names
            the file and the key.
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
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for key, spec in _flatten(raw, where).items():
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
    for i, p in enumerate(params):
        _check_against_config(base, p, where)
        _check_when(p, params[:i], params[i:], base, where)
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
    allowed = ({"type", "choices", "when"} if kind == "categorical"
               else {"type", "low", "high", "log", "when"})
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{at}: unknown field {extra[0]!r} for a {kind}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    when = _parse_when(spec["when"], at) if "when" in spec else ()
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}: categorical needs a non-empty list 'choices'")
        return Param(key, "categorical", choices=tuple(choices), when=when)
    low, high = (_bound(spec.get(name), name, kind, at) for name in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log must be true or false, but got {log!r}")
    if low > high:
        raise ConfigError(f"{at}: low ({low:g}) must not exceed high ({high:g})")
    if log and low <= 0:
        raise ConfigError(f"{at}: log scale needs low > 0, but got {low:g}")
    tp = field_type(key)
    numeric = {int, float} | {a for a in get_args(tp) if a in (int, float)}
    if get_origin(tp) is Literal or tp is bool or tp is str or not numeric & {int, float}:
        raise ConfigError(f"{at}: a {kind} range on a non-numeric field; use categorical")
    if kind == "float" and tp is int:  # a float would reach the config as 3.7 and be refused
        raise ConfigError(f"{at}: an integer key needs type: int")
    return Param(key, kind, low=low, high=high, log=log, when=when)


def _bound(value: Any, name: str, kind: str, at: str) -> float:
    """A range's ``low`` or ``high`` as read from the file, checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{at}: {name} must be a number, but got {value!r}")
    if kind == "int" and not float(value).is_integer():
        raise ConfigError(f"{at}: {name} must be an integer for type int, but got {value!r}")
    return float(value)


def _parse_when(raw: Any, at: str) -> tuple[Condition, ...]:
    """``{key: value}`` or ``{key: [values]}`` -> ((key, (values...)), ...); shape only."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{at}: when: expected a mapping of keys to a value or a list of "
                          f"values, e.g. when: {{model.use_cbd: true}}, but got {raw!r}")
    out: list[Condition] = []
    for key, value in raw.items():
        try:
            field_type(str(key))
        except ConfigError as exc:
            raise ConfigError(f"{at}: when: {exc}") from None
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
            raise ConfigError(f"{at}: when: {key}: expected a value or a non-empty list of "
                              f"values, but got {value!r}")
        out.append((str(key), values))
    return tuple(out)


def _check_when(p: Param, earlier: list[Param], rest: list[Param], base: ExperimentConfig,
                where: str) -> None:
    """Each condition reads an earlier parameter or a fixed key, with values it can take."""
    at = f"{where}: {p.key}: when"
    before = {q.key: q for q in earlier}
    later = {q.key for q in rest}
    for key, values in p.when:
        if key == p.key:
            raise ConfigError(f"{at}: {key}: a parameter cannot depend on itself")
        if key in later:
            raise ConfigError(f"{at}: {key} is searched later in the file; move it above "
                              f"{p.key} (a condition reads keys defined earlier)")
        for value in values:
            if key in before:
                _check_reachable(before[key], value, at)
            else:  # fixed: the config must accept the value (type, Literal, range)
                try:
                    base.replace({key: value}, where=at)
                except ConfigError as exc:
                    fixed = base.to_dict()[key]
                    raise ConfigError(f"{exc} (fixed at {fixed!r}; a condition value must be "
                                      "one this key can take)") from None


def _check_reachable(q: Param, value: Any, at: str) -> None:
    """``value`` is one the earlier parameter ``q`` can be sampled at."""
    if q.kind == "categorical":
        if not any(_same(value, c) for c in q.choices):
            raise ConfigError(f"{at}: {q.key}: {value!r} is never sampled; its choices are "
                              f"{list(q.choices)}")
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (q.kind == "int" and not float(value).is_integer()):
        raise ConfigError(f"{at}: {q.key}: {value!r} is never sampled; it takes "
                          f"{'integers' if q.kind == 'int' else 'numbers'} in "
                          f"[{q.low:g}, {q.high:g}]")
    if not q.bounds[0] <= value <= q.bounds[1]:
        raise ConfigError(f"{at}: {q.key}: {value!r} is never sampled; it is outside its range "
                          f"[{q.low:g}, {q.high:g}]")


def _check_against_config(base: ExperimentConfig, p: Param, where: str) -> None:
    values = list(p.choices) if p.kind == "categorical" else list(p.bounds)
    for value in values:
        if p.kind == "int":
            value = int(value)
        try:
            base.replace({p.key: value}, where=where)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from the range of {p.key})") from None
