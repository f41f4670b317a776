"""``contract.json``: what a saved model takes and gives, read and checked before any member.

The contract names the dataset, the input shape ``[C, L]``, the length policy that fits other
lengths to ``L`` (``pad`` or ``resample``, as :mod:`cbdtune.data._lengths`), how inputs are
normalised (inside the model: inputs are raw series), the class names as the dataset spells
them, the cbdtune version, and per member its file, kind, flat config, seed, metadata and
weight (:mod:`cbdtune.serving`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import __version__
from cbdtune.config import CbdtuneError, LengthPolicy
from cbdtune.serving.folder import CONTRACT_FILE, ModelError, first_line, open_regular

FORMAT_VERSION = 1
NORMALISATION = ("inputs are raw series: per-series, per-channel instance normalisation (mean 0, "
                 "std 1 over time) is inside the model, so do not normalise them yourself")
LENGTH_POLICIES = ("pad", "resample")  # DataConfig.length_policy; cbdtune.data._lengths.to_length
MAX_CONTRACT_BYTES = 16 * 2**20  # a contract of 1,000 members is ~10 MB
# C * L of one series: 2**26 float32 values (256 MiB). UEA/UCR's largest is ~108k (EigenWorms,
# 6 x 17,984); a contract above it would make every input series that large (pad, resample).
MAX_SERIES_VALUES = 2**26
# A member's kind in the contract: a CBD classifier (``member_i.pt``) or a MiniRocket baseline
# (``member_i/`` holding ``minirocket.npz`` + ``minirocket.json``, :mod:`cbdtune.baselines`).
CBD, MINIROCKET = "cbd", "minirocket"
KINDS = (CBD, MINIROCKET)
WEIGHT_SUM_TOL = 1e-6


class InputError(CbdtuneError):
    """Input series the model cannot take: one line saying what, where, and what to do."""


@dataclass(frozen=True)
class ModelContract:
    """What ``contract.json`` holds: the model's input, output and members (module docstring)."""

    dataset: str
    in_channels: int
    seq_len: int
    length_policy: LengthPolicy  # read from JSON as any value, checked by problem()
    class_names: list[str]
    members: list[dict[str, Any]]
    normalisation: str = NORMALISATION
    cbdtune_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def input_shape(self) -> str:
        """``[N, C, L]`` with C and L filled in, for messages."""
        return f"[N, {self.in_channels}, {self.seq_len}]"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    @property
    def max_magnitude(self) -> float:
        """The largest |value| an input may hold: the model computes in float32, and its
        instance normalisation sums the squares of a channel's ``L`` centred values (up to
        twice the largest magnitude), which must stay below float32's maximum."""
        return float(np.sqrt(np.finfo(np.float32).max / self.seq_len) / 2)

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelContract:
        """Read and check ``<model_dir>/contract.json`` (a regular file, not a link).

        Raises:
            ModelError: no such file, not JSON, a newer format, missing fields, or fields of
                the wrong type or value (shape, length policy, class names, members).
        """
        path = Path(model_dir) / CONTRACT_FILE
        if not os.path.lexists(path):
            raise ModelError(f"{model_dir}: not a cbdtune model directory (no {CONTRACT_FILE}); "
                             f"give the folder save_model wrote or an MLflow model URI")
        try:
            with open_regular(path, "the contract", MAX_CONTRACT_BYTES) as handle:
                raw = json.loads(handle.read(MAX_CONTRACT_BYTES))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: cannot be read as JSON ({first_line(exc)}); save the "
                             f"model again") from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelError(f"{path}: format_version {version!r} is not one this cbdtune "
                             f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade cbdtune")
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - set(raw))
        if missing:
            raise ModelError(f"{path}: missing {', '.join(missing)}; save the model again")
        contract = cls(**{k: v for k, v in raw.items() if k in names})
        problem = contract.problem()
        if problem:
            raise ModelError(f"{path}: {problem}; save the model again with cbdtune")
        return contract

    def problem(self) -> str:
        """What is wrong with the fields' types or values ("" when nothing is)."""
        for name in ("in_channels", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{name} must be a positive integer, but is {value!r}"
        if self.in_channels * self.seq_len > MAX_SERIES_VALUES:
            return (f"in_channels x seq_len = {self.in_channels} x {self.seq_len} is more than "
                    f"the {MAX_SERIES_VALUES} values a series may have")
        if self.length_policy not in LENGTH_POLICIES:
            return (f"length_policy {self.length_policy!r} is unknown (this cbdtune knows "
                    f"{', '.join(LENGTH_POLICIES)})")
        names = self.class_names
        if not isinstance(names, list) or not names or \
                not all(isinstance(c, str) for c in names):
            return f"class_names must be a non-empty list of strings, but is {str(names)[:100]}"
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            return (f"class_names repeats {', '.join(map(repr, repeated[:5]))}; each class "
                    f"needs its own name")
        if not isinstance(self.members, list) or not self.members:
            return "members must be a non-empty list"
        for i, entry in enumerate(self.members):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not isinstance(entry.get("config"), dict):
                return f"member {i} must be an object with a \"file\" name and a \"config\""
            if entry.get("kind", CBD) not in KINDS:
                return (f"member {i} is of kind {str(entry.get('kind'))[:40]!r}, which this "
                        f"cbdtune does not know ({', '.join(KINDS)})")
        return weights_problem(self.members)


def weights_problem(members: list[dict[str, Any]]) -> str:
    """"" when no member has a weight (equal weights) or every one has a finite weight > 0 and
    they sum to 1 (within :data:`WEIGHT_SUM_TOL`); else what is wrong."""
    weights: list[Any] = [m.get("weight") for m in members]  # numbers once checked below
    if all(w is None for w in weights):
        return ""
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w)
               and w > 0 for w in weights):
        return (f"member weights must all be numbers > 0 (or all absent), but are "
                f"{str(weights)[:100]}")
    if abs(sum(weights) - 1.0) > WEIGHT_SUM_TOL:
        return f"member weights must sum to 1, but sum to {sum(weights):.6g}"
    return ""


def member_weights(contract: ModelContract) -> list[float]:
    """Each member's weight in the ensemble's average: the contract's, else equal."""
    given: list[Any] = [m.get("weight") for m in contract.members]  # checked by read()
    if all(w is None for w in given):
        return [1.0 / len(given)] * len(given)
    return [float(w) for w in given]
