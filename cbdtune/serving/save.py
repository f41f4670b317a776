"""save_model: a model directory for one or more trained members, written whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbdtune.config import LengthPolicy
from cbdtune.serving.contract import CBD, ModelContract, weights_problem
from cbdtune.serving.folder import CONTRACT_FILE, ModelError
from cbdtune.serving.members import (
    BaselineMember,
    Member,
    build_classifier,
    check_finite_weights,
    series_length,
)


def save_model(path: str | Path, members: Sequence[Member | BaselineMember], *,
               class_names: Sequence[str], dataset: str, overwrite: bool = False,
               weights: Sequence[float] | None = None,
               layout: tuple[int, int, LengthPolicy] | None = None) -> Path:
    """Write a model directory (module docstring) for one or more trained members.

    The directory is written under a temporary name next to ``path`` and renamed into place, so
    a crash never leaves half a model at ``path``.

    Args:
        path: the directory to create.
        members: ``(config, CBDClassifier.state_dict(), metadata)`` per CBD member; every config
            has ``model.in_channels``, ``model.seq_len`` and ``model.num_classes`` set, the same
            for all. A :class:`BaselineMember` (MiniRocket) is saved as arrays, never pickled.
            Metadata must be JSON-serialisable (other values are stored as strings).
        class_names: the dataset's class names, index = class; ``len == model.num_classes``.
        dataset: the dataset's name, recorded in the contract.
        overwrite: replace an existing directory at ``path`` (else it is an error).
        weights: each member's weight in the ensemble's average, > 0, summing to 1 (ensemble
            selection's); None: equal weights.
        layout: ``(in_channels, seq_len, length_policy)`` of the inputs; needed when no member
            is a CBD classifier (whose config says it), else checked against theirs.

    Returns:
        ``path``.

    Raises:
        ModelError: no members, members that disagree on shape, class names that do not match,
            weights that are not one positive number per member summing to 1, a state_dict
            that does not fit its config or holds NaN or inf, or ``path`` exists without
            ``overwrite``.
    """
    path = Path(path)
    layout = _check_members(members, class_names, layout)
    _check_weights(weights, len(members))
    if path.exists() and not overwrite:
        raise ModelError(f"{path}: already exists; remove it, choose another path or pass "
                         f"overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model is meant to be read by others
    try:
        entries = [_save_member(tmp, i, m) for i, m in enumerate(members)]
        for entry, w in zip(entries, weights or (), strict=False):
            entry["weight"] = float(w)
        contract = ModelContract(dataset=dataset, in_channels=layout[0], seq_len=layout[1],
                                 length_policy=layout[2],
                                 class_names=[str(c) for c in class_names], members=entries)
        (tmp / CONTRACT_FILE).write_text(contract.to_json())
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_member(folder: Path, i: int, member: Member | BaselineMember) -> dict[str, Any]:
    """Write member ``i`` into ``folder``; its contract entry."""
    import torch

    if isinstance(member, BaselineMember):
        member.model.save(folder / f"member_{i}")  # minirocket.npz (arrays) + minirocket.json
        return {"file": f"member_{i}", "kind": member.kind, "seed": int(member.model.seed),
                "config": {}, "metadata": dict(member.metadata)}
    cfg, state, meta = member
    # "_orig_mod." is what torch.compile puts in front of every key.
    state = {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in state.items()}
    check_finite_weights(state, f"save_model: member {i}")
    build_classifier(cfg, state, where=f"member {i}")  # fails now, not at load time
    torch.save(state, folder / f"member_{i}.pt")
    return {"file": f"member_{i}.pt", "kind": CBD, "seed": cfg.train.seed,
            "config": cfg.to_dict(), "metadata": dict(meta)}


def _check_weights(weights: Sequence[float] | None, n: int) -> None:
    if weights is None:
        return
    entries = [{"weight": w} for w in weights]
    problem = weights_problem(entries) if len(entries) == n else (
        f"{len(entries)} weights for {n} members")
    if problem:
        raise ModelError(f"save_model: {problem}; give one weight > 0 per member, summing to 1 "
                         f"(a Selection's weights), or none")


def _check_members(members: Sequence[Member | BaselineMember], class_names: Sequence[str],
                   layout: tuple[int, int, LengthPolicy] | None) -> tuple[int, int, LengthPolicy]:
    """The inputs' ``(in_channels, seq_len, length_policy)``, checked against every member."""
    if not members:
        raise ModelError("save_model: no members; give at least one (config, state_dict, meta)")
    cbd = [m for m in members if not isinstance(m, BaselineMember)]
    if not cbd and layout is None:
        raise ModelError("save_model: no CBD member to read the input layout from; pass "
                         "layout=(in_channels, seq_len, length_policy)")
    first = cbd[0][0] if cbd else None
    key = (first.model.in_channels, first.model.seq_len, first.model.num_classes,
           first.data.length_policy) if first else (
        layout[0], layout[1], len(class_names), layout[2])  # type: ignore[index]
    for i, m in enumerate(members):
        if isinstance(m, BaselineMember):
            other = (m.model.n_channels, series_length(m.model.length, key[1]),
                     m.model.n_classes, key[3])
        else:
            cfg = m[0]
            other = (cfg.model.in_channels, cfg.model.seq_len, cfg.model.num_classes,
                     cfg.data.length_policy)
        if other != key:
            raise ModelError(f"save_model: member {i} has (in_channels, seq_len, num_classes, "
                             f"length_policy) = {other} but the ensemble has {key}; an "
                             f"ensemble's members must share them")
    if layout is not None and tuple(layout) != (key[0], key[1], key[3]):
        raise ModelError(f"save_model: layout {tuple(layout)} but the members have "
                         f"{(key[0], key[1], key[3])}")
    if len(class_names) != key[2] or len(set(class_names)) != len(class_names):
        raise ModelError(f"save_model: {len(class_names)} class names {list(class_names)[:10]} "
                         f"for model.num_classes={key[2]}; give the dataset's "
                         f"class names, one distinct name per class")
    return key[0], key[1], key[3]


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an old ``path`` is moved aside first and removed after."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None:
            os.replace(old, path)  # put the previous model back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
