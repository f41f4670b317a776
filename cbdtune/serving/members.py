"""A saved model's members: CBD classifiers (config + weights) and MiniRocket baselines.

A CBD member is rebuilt from its config alone (``build_model`` and its stage's ``build_head``).
Reading one checks everything before anything is allocated (:func:`load_member`): its config
against the contract, its file's size against what the config builds on PyTorch's ``meta``
device, ``torch.load(weights_only=True)``, the tensors' names, shapes and finiteness. A
baseline is two plain files copied out of the folder and read without unpickling
(:func:`load_baseline`).
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbdtune import __version__
from cbdtune.config import CbdtuneError, ExperimentConfig
from cbdtune.serving.contract import MINIROCKET, ModelContract
from cbdtune.serving.folder import (
    CONTRACT_FILE,
    ModelError,
    check_zip,
    file_kind,
    first_line,
    member_file,
    open_regular,
)

# Buffers a member's config derives rather than stores (DFT matrices, Bernstein coefficients):
# a config whose derived buffers exceed this is refused before anything is allocated.
MAX_DERIVED_BYTES = 2**30
MAX_BASELINE_BYTES = 2**30  # a MiniRocket member: ~10k features x K classes of float64

# One trained member: its config, its ``CBDClassifier.state_dict()``, free-form metadata.
Member = tuple[ExperimentConfig, dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class BaselineMember:
    """A fitted baseline member for :func:`save_model`: a
    :class:`cbdtune.baselines.MiniRocketMember` and free-form metadata."""

    model: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = MINIROCKET


# State entries a model built by an older cbdtune may lack; they keep the value the model is
# built with (the classifier's temperature is 1.0 then: no calibration).
OPTIONAL_STATE = ("temperature",)


def new_classifier(cfg: ExperimentConfig) -> Any:
    """The classifier ``cfg`` trains, untrained: its model and the head of the stage it selected
    (``train.classifier``: one stage of cbdtune.stages, or "both", whose stages build one head)."""
    from cbdtune import stages
    from cbdtune.model import CBDClassifier, build_model

    model = build_model(cfg.model)
    stage = stages.get(next(stages.selected(cfg.train)))
    return CBDClassifier(model, stage.build_head(cfg.model, model.num_tokens))


def build_classifier(cfg: ExperimentConfig, state: dict[str, Any], *, where: str) -> Any:
    """A ``CBDClassifier`` for ``cfg`` with ``state`` loaded, in eval mode.

    Every key must match except :data:`OPTIONAL_STATE` entries, which may be absent.
    """
    clf = new_classifier(cfg)
    try:
        result = clf.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k.rsplit(".", 1)[-1] not in OPTIONAL_STATE]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys "
                               f"{result.unexpected_keys[:3]}")
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelError(f"{where}: the weights do not fit the model its config builds "
                         f"({reason}); save the state_dict of the classifier that config "
                         f"trained") from None
    return clf.eval()


def series_length(fitted: int, seq_len: int) -> int:
    """The input length a MiniRocket member fitted on ``fitted`` steps takes: ``seq_len`` when
    ``fitted`` is it, or its padding to the kernel's 9 steps (:mod:`cbdtune.baselines`)."""
    from cbdtune.baselines import KERNEL_LENGTH

    return seq_len if fitted == max(seq_len, KERNEL_LENGTH) else fitted


def load_member(model_dir: Path, contract: ModelContract, i: int) -> tuple[ExperimentConfig, Any]:
    """Member ``i`` of a model directory: its config and its classifier (CPU, eval mode).

    Nothing outside ``model_dir`` is read and nothing is built before the checks pass: the
    config must agree with the contract (channels, length, classes, length policy); the file
    must be a plain name in the folder and a regular file (not a link, FIFO, folder); the sizes
    the config implies are computed on PyTorch's ``meta`` device (no memory) and the file's
    size must fit them; the file must be ``torch.save``'s uncompressed zip, read with
    ``weights_only=True``; its tensors must have the config's names and shapes and be finite.

    Raises:
        ModelError: any of the above, in one line naming the member and what to do.
    """
    import torch

    entry = contract.members[i]
    where = f"{model_dir / CONTRACT_FILE}: member {i}"
    try:
        cfg = ExperimentConfig.from_dict(entry["config"], where=where)
    except CbdtuneError as exc:
        raise ModelError(f"{exc}; the model was saved by cbdtune "
                         f"{contract.cbdtune_version}, this is {__version__}") from None
    _check_config(cfg, contract, where)
    file = member_file(model_dir, entry["file"], where)
    expected, stored_bytes = _expected_state(cfg, where)
    slack = 2**20 + 4096 * len(expected)  # pickled key names, zip headers, 64-byte alignment
    with open_regular(file, f"member {i}'s weights", stored_bytes + slack) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < stored_bytes:
            raise ModelError(f"{where}: {file.name} holds {size} bytes, but its config's model "
                             f"stores {stored_bytes}; the contract and its weights disagree: "
                             f"save the model again")
        check_zip(handle, file, where)
        try:
            state = torch.load(handle, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises pickle, zip, EOF and OS errors here
            raise ModelError(f"{where}: {file.name} does not load as a tensor dict "
                             f"({type(exc).__name__}: {first_line(exc)[:200]}); save the model "
                             f"again") from None
    _check_state(state, expected, where, file.name)
    return cfg, build_classifier(cfg, state, where=where)


def load_baseline(model_dir: Path, contract: ModelContract, i: int) -> Any:
    """Member ``i``, a MiniRocket baseline: its folder ``member_i/`` must be a plain name in
    ``model_dir`` and a real folder (not a link); its two files regular files of bounded size
    (:func:`open_regular`: ``lstat`` before ``open``). Their bytes are copied into a private
    temporary folder and read there by :func:`cbdtune.baselines.load` (``np.load`` with
    ``allow_pickle=False`` and JSON: nothing is unpickled).

    Raises:
        ModelError: any of the above, or a member that does not fit the contract.
    """
    from cbdtune import baselines

    where = f"{model_dir / CONTRACT_FILE}: member {i}"
    folder = member_file(model_dir, contract.members[i]["file"], where)
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise ModelError(f"{where}: {folder.name} cannot be read ({first_line(exc)}); save the "
                         f"model again") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ModelError(f"{where}: {folder.name} is {file_kind(info.st_mode) or 'a file'}, "
                         f"not a folder of the model; a baseline member is a folder of its own "
                         f"plain files (save the model again)")
    with tempfile.TemporaryDirectory(prefix="cbdtune-member-") as tmp:
        for name in (baselines.NPZ, baselines.JSON):
            with open_regular(folder / name, f"member {i}'s {name}", MAX_BASELINE_BYTES) as h:
                (Path(tmp) / name).write_bytes(h.read(MAX_BASELINE_BYTES))
        try:
            member = baselines.load(tmp)
        except CbdtuneError as exc:
            raise ModelError(f"{where}: {first_line(exc).replace(tmp, folder.name)}") from None
    fits = (member.n_channels, series_length(member.length, contract.seq_len),
            member.n_classes)
    want = (contract.in_channels, contract.seq_len, len(contract.class_names))
    if fits != want:
        raise ModelError(f"{where}: fitted on (channels, length, classes) = {fits}, but the "
                         f"contract says {want}; save the model again")
    return member


def _check_config(cfg: ExperimentConfig, contract: ModelContract, where: str) -> None:
    pairs = {"model.in_channels": (cfg.model.in_channels, contract.in_channels),
             "model.seq_len": (cfg.model.seq_len, contract.seq_len),
             "model.num_classes": (cfg.model.num_classes, len(contract.class_names)),
             "data.length_policy": (cfg.data.length_policy, contract.length_policy)}
    for key, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise ModelError(f"{where}: its config has {key}={mine!r}, but the contract says "
                             f"{theirs!r} (in_channels, seq_len, class_names, length_policy); "
                             f"the contract and its members disagree: save the model again")


def _expected_state(cfg: ExperimentConfig, where: str) -> tuple[dict[str, Any], int]:
    """``({key: meta tensor}, bytes they store)`` of the classifier ``cfg`` builds, built on the
    ``meta`` device (shapes only, no memory).

    Raises:
        ModelError: the config does not build, or its derived buffers would be absurdly large.
    """
    import torch

    try:
        with torch.device("meta"):
            clf = new_classifier(cfg)
    except Exception as exc:  # a config from_dict accepts but the model code refuses
        raise ModelError(f"{where}: its config does not build a model ({first_line(exc)}); "
                         f"save the model again") from None
    state = clf.state_dict()
    derived = sum(b.numel() * b.element_size() for name, b in clf.named_buffers()
                  if name not in state)
    if derived > MAX_DERIVED_BYTES:
        raise ModelError(f"{where}: its config (model.seq_len={cfg.model.seq_len}, "
                         f"d_model={cfg.model.d_model}) needs {derived / 2**30:.1f} GiB of "
                         f"derived buffers, more than the {MAX_DERIVED_BYTES / 2**30:.0f} GiB "
                         f"allowed; it cannot be a model cbdtune trained")
    stored = sum(t.numel() * t.element_size() for k, t in state.items()
                 if k.rsplit(".", 1)[-1] not in OPTIONAL_STATE)
    return dict(state), stored


def _check_state(state: Any, expected: dict[str, Any], where: str, name: str) -> None:
    """Names, shapes and finiteness of a loaded state_dict against the meta model's."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ModelError(f"{where}: {name} is not a dict of tensors; save the classifier's "
                         f"state_dict()")
    for key, value in state.items():
        want = expected.get(key)
        if want is None:
            continue  # build_classifier names unexpected keys
        if tuple(value.shape) != tuple(want.shape):
            raise ModelError(f"{where}: {name}: {key} has shape {list(value.shape)}, but the "
                             f"config builds {list(want.shape)}; the contract and its weights "
                             f"disagree: save the model again")
    check_finite_weights(state, f"{where}: {name}")


def check_finite_weights(state: dict[str, Any], where: str) -> None:
    """Raise on the first floating tensor of ``state`` that holds NaN or inf.

    Raises:
        ModelError: naming the tensor and how many such values it holds.
    """
    import torch

    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ModelError(f"{where}: {key} holds {bad} NaN or infinite weight(s); the model "
                             f"diverged or the file is damaged: train it again")
