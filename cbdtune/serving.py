"""The model a search hands over: a directory format, the ensemble that reads it, MLflow logging.

A model directory holds everything needed to classify raw series, and nothing that runs code
when it is read:

    contract.json   what the model takes and gives (below)
    member_0.pt     one ``CBDClassifier.state_dict()`` per member (``torch.save``); read only with
    member_1.pt     ``torch.load(weights_only=True)``, which refuses to unpickle Python objects
    ...

``contract.json`` names the dataset, the input shape ``[C, L]``, the length policy that fits
other lengths to ``L`` (``pad`` or ``resample``, as :mod:`cbdtune.data._lengths`), how inputs are
normalised (inside the model: inputs are raw series), the class names as the dataset spells them,
the cbdtune version, and per member its file, flat config (``ExperimentConfig.to_dict()``), seed
and free-form metadata (e.g. the MLflow run it came from). A member is rebuilt from its config
alone through ``build_model`` / ``build_head``.

A member may instead be a MiniRocket baseline (``"kind": "minirocket"``, :mod:`cbdtune.baselines`):
a folder ``member_i/`` of two plain files, ``minirocket.npz`` (arrays, read with
``allow_pickle=False``) and ``minirocket.json``, refused unless both are regular files in a real
folder of the model (:func:`load_baseline`).

The ensemble's probability is the weighted mean over members of each member's softmax, with the
contract's ``weight`` per member (ensemble selection's, summing to 1), or equal weights when the
contract has none (one member is an ensemble of one). :func:`log_model` logs a directory to MLflow as a pyfunc model *from code*
(``cbdtune/_pyfunc_model.py``), so that loading it never unpickles an object either.

Example:
    >>> save_model("out/model", [(cfg, clf.state_dict(), {"run_id": rid})],
    ...            class_names=ds.class_names, dataset=ds.name)  # doctest: +SKIP
    >>> CBDEnsemble.load("out/model").predict(x)  # doctest: +SKIP
    ['1.0', '5.0', ...]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import __version__
from cbdtune.config import CbdtuneError, ExperimentConfig
from cbdtune.data._lengths import to_length

FORMAT_VERSION = 1
CONTRACT_FILE = "contract.json"
ARTIFACT_KEY = "cbd_model"  # the model directory's name among the pyfunc model's artifacts
BATCH_SIZE = 256
NORMALISATION = ("inputs are raw series: per-series, per-channel instance normalisation (mean 0, "
                 "std 1 over time) is inside the model, so do not normalise them yourself")
PYFUNC_CODE = Path(__file__).with_name("_pyfunc_model.py")  # MLflow's models-from-code file
LENGTH_POLICIES = ("pad", "resample")  # DataConfig.length_policy; cbdtune.data._lengths.to_length
MAX_CONTRACT_BYTES = 16 * 2**20  # a contract of 1,000 members is ~10 MB
# C * L of one series: 2**26 float32 values (256 MiB). UEA/UCR's largest is ~108k (EigenWorms,
# 6 x 17,984); a contract above it would make every input series that large (pad, resample).
MAX_SERIES_VALUES = 2**26
# Buffers a member's config derives rather than stores (DFT matrices, Bernstein coefficients):
# a config whose derived buffers exceed this is refused before anything is allocated.
MAX_DERIVED_BYTES = 2**30

# One trained member: its config, its ``CBDClassifier.state_dict()``, free-form metadata.
Member = tuple[ExperimentConfig, dict[str, Any], dict[str, Any]]
# A member's kind in the contract: a CBD classifier (``member_i.pt``) or a MiniRocket baseline
# (``member_i/`` holding ``minirocket.npz`` + ``minirocket.json``, :mod:`cbdtune.baselines`).
CBD, MINIROCKET = "cbd", "minirocket"
KINDS = (CBD, MINIROCKET)
WEIGHT_SUM_TOL = 1e-6
MAX_BASELINE_BYTES = 2**30  # a MiniRocket member: ~10k features x K classes of float64


@dataclass(frozen=True)
class BaselineMember:
    """A fitted baseline member for :func:`save_model`: a
    :class:`cbdtune.baselines.MiniRocketMember` and free-form metadata."""

    model: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = MINIROCKET


class InputError(CbdtuneError):
    """Input series the model cannot take: one line saying what, where, and what to do."""


class ModelError(CbdtuneError):
    """A model directory or URI that cannot be read or used."""


@dataclass(frozen=True)
class ModelContract:
    """What ``contract.json`` holds: the model's input, output and members (module docstring)."""

    dataset: str
    in_channels: int
    seq_len: int
    length_policy: str
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
            raise ModelError(f"{path}: cannot be read as JSON ({_first_line(exc)}); save the "
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
        return _weights_problem(self.members)


def _weights_problem(members: list[dict[str, Any]]) -> str:
    """"" when no member has a weight (equal weights) or every one has a finite weight > 0 and
    they sum to 1 (within :data:`WEIGHT_SUM_TOL`); else what is wrong."""
    weights = [m.get("weight") for m in members]
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
    given = [m.get("weight") for m in contract.members]
    if all(w is None for w in given):
        return [1.0 / len(given)] * len(given)
    return [float(w) for w in given]


def open_regular(path: Path, what: str, max_bytes: int) -> Any:
    """Open ``path`` for reading only if it is a regular file of at most ``max_bytes``.

    A symbolic link, a FIFO, a device or a folder is refused from ``os.lstat`` before any
    ``open`` (opening a FIFO would block); the descriptor is opened with ``O_NOFOLLOW`` and
    ``O_NONBLOCK`` and checked again with ``fstat``, so a file swapped in between is refused too.

    Raises:
        ModelError: not there, not a regular file, or larger than ``max_bytes``.
    """
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ModelError(f"{path}: {what} cannot be read ({_first_line(exc)}); save the model "
                         f"again") from None
    kind = _file_kind(info.st_mode)
    if kind:
        raise ModelError(f"{path}: {what} is {kind}, not a regular file; a model folder holds "
                         f"its own plain files (copy the real file in its place)")
    if info.st_size > max_bytes:
        raise ModelError(f"{path}: {what} holds {info.st_size} bytes, more than the "
                         f"{max_bytes} it can hold; save the model again")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ModelError(f"{path}: {what} cannot be opened ({_first_line(exc)})") from None
    handle = os.fdopen(fd, "rb")
    if _file_kind(os.fstat(fd).st_mode):
        handle.close()
        raise ModelError(f"{path}: {what} changed into something else than a regular file "
                         f"while being opened; check who writes to the model folder")
    return handle


def _file_kind(mode: int) -> str:
    """"" for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return ""
    kinds = [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "a device or special file")


# ---- saving -------------------------------------------------------------------------------------


def save_model(path: str | Path, members: Sequence[Member | BaselineMember], *,
               class_names: Sequence[str], dataset: str, overwrite: bool = False,
               weights: Sequence[float] | None = None,
               layout: tuple[int, int, str] | None = None) -> Path:
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
    _build_classifier(cfg, state, where=f"member {i}")  # fails now, not at load time
    torch.save(state, folder / f"member_{i}.pt")
    return {"file": f"member_{i}.pt", "kind": CBD, "seed": cfg.train.seed,
            "config": cfg.to_dict(), "metadata": dict(meta)}


def _series_length(fitted: int, seq_len: int) -> int:
    """The input length a MiniRocket member fitted on ``fitted`` steps takes: ``seq_len`` when
    ``fitted`` is it, or its padding to the kernel's 9 steps (:mod:`cbdtune.baselines`)."""
    from cbdtune.baselines import KERNEL_LENGTH

    return seq_len if fitted == max(seq_len, KERNEL_LENGTH) else fitted


def _check_weights(weights: Sequence[float] | None, n: int) -> None:
    if weights is None:
        return
    entries = [{"weight": w} for w in weights]
    problem = _weights_problem(entries) if len(entries) == n else (
        f"{len(entries)} weights for {n} members")
    if problem:
        raise ModelError(f"save_model: {problem}; give one weight > 0 per member, summing to 1 "
                         f"(a Selection's weights), or none")


def _check_members(members: Sequence[Member | BaselineMember], class_names: Sequence[str],
                   layout: tuple[int, int, str] | None) -> tuple[int, int, str]:
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
            other = (m.model.n_channels, _series_length(m.model.length, key[1]),
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


# State entries a model built by an older cbdtune may lack; they keep the value the model is
# built with (the classifier's temperature is 1.0 then: no calibration).
OPTIONAL_STATE = ("temperature",)


def _new_classifier(cfg: ExperimentConfig) -> Any:
    """The classifier ``cfg`` trains, untrained: its model and the head of the stage it selected
    (``train.classifier``: one stage of cbdtune.stages, or "both", whose stages build one head)."""
    from cbdtune import stages
    from cbdtune.model import CBDClassifier, build_model

    model = build_model(cfg.model)
    stage = stages.get(next(stages.selected(cfg.train)))
    return CBDClassifier(model, stage.build_head(cfg.model, model.num_tokens))


def _build_classifier(cfg: ExperimentConfig, state: dict[str, Any], *, where: str) -> Any:
    """A ``CBDClassifier`` for ``cfg`` with ``state`` loaded, in eval mode.

    Every key must match except :data:`OPTIONAL_STATE` entries, which may be absent.
    """
    clf = _new_classifier(cfg)
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


# ---- reading a member, checked before anything is allocated ------------------------------------


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
    file = _member_file(model_dir, entry["file"], where)
    expected, stored_bytes = _expected_state(cfg, where)
    slack = 2**20 + 4096 * len(expected)  # pickled key names, zip headers, 64-byte alignment
    with open_regular(file, f"member {i}'s weights", stored_bytes + slack) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < stored_bytes:
            raise ModelError(f"{where}: {file.name} holds {size} bytes, but its config's model "
                             f"stores {stored_bytes}; the contract and its weights disagree: "
                             f"save the model again")
        _check_zip(handle, file, where)
        try:
            state = torch.load(handle, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises pickle, zip, EOF and OS errors here
            raise ModelError(f"{where}: {file.name} does not load as a tensor dict "
                             f"({type(exc).__name__}: {_first_line(exc)[:200]}); save the model "
                             f"again") from None
    _check_state(state, expected, where, file.name)
    return cfg, _build_classifier(cfg, state, where=where)


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
    folder = _member_file(model_dir, contract.members[i]["file"], where)
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise ModelError(f"{where}: {folder.name} cannot be read ({_first_line(exc)}); save the "
                         f"model again") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ModelError(f"{where}: {folder.name} is {_file_kind(info.st_mode) or 'a file'}, "
                         f"not a folder of the model; a baseline member is a folder of its own "
                         f"plain files (save the model again)")
    with tempfile.TemporaryDirectory(prefix="cbdtune-member-") as tmp:
        for name in (baselines.NPZ, baselines.JSON):
            with open_regular(folder / name, f"member {i}'s {name}", MAX_BASELINE_BYTES) as h:
                (Path(tmp) / name).write_bytes(h.read(MAX_BASELINE_BYTES))
        try:
            member = baselines.load(tmp)
        except CbdtuneError as exc:
            raise ModelError(f"{where}: {_first_line(exc).replace(tmp, folder.name)}") from None
    fits = (member.n_channels, _series_length(member.length, contract.seq_len),
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


def _member_file(model_dir: Path, name: str, where: str) -> Path:
    """``model_dir / name`` for a plain file name; a path, ``..`` or an absolute name is refused."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
            or Path(name).is_absolute() or Path(name).name != name:
        raise ModelError(f"{where}: file {name!r} is not a plain file name; a member's weights "
                         f"are a file in the model folder itself (e.g. member_0.pt)")
    return model_dir / name


def _expected_state(cfg: ExperimentConfig, where: str) -> tuple[dict[str, Any], int]:
    """``({key: meta tensor}, bytes they store)`` of the classifier ``cfg`` builds, built on the
    ``meta`` device (shapes only, no memory).

    Raises:
        ModelError: the config does not build, or its derived buffers would be absurdly large.
    """
    import torch

    try:
        with torch.device("meta"):
            clf = _new_classifier(cfg)
    except Exception as exc:  # a config from_dict accepts but the model code refuses
        raise ModelError(f"{where}: its config does not build a model ({_first_line(exc)}); "
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


def _check_zip(handle: Any, file: Path, where: str) -> None:
    """``torch.save``'s format: a zip of stored (uncompressed) entries, so that what is read
    into memory is never more than the file holds."""
    try:
        entries = zipfile.ZipFile(handle).infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"{where}: {file.name} is not a torch.save file ({_first_line(exc)}); "
                         f"save the model again") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise ModelError(f"{where}: {file.name} holds compressed entries, which torch.save "
                         f"never writes; save the model again")
    handle.seek(0)


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
            continue  # _build_classifier names unexpected keys
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


# ---- loading and predicting ---------------------------------------------------------------------


@dataclass
class CBDEnsemble:
    """The softmax average of one or more trained classifiers, with the input contract.

    Build it with :meth:`load`. Inputs are raw series; see :meth:`check_input` for what is
    accepted and how other lengths are fitted.
    """

    contract: ModelContract
    members: list[Any]  # CBDClassifier (eval mode, on ``device``) or a MiniRocket member
    device: str = "cpu"
    configs: list[ExperimentConfig | None] = field(default_factory=list)  # None: a baseline
    weights: list[float] = field(default_factory=list)  # empty: equal weights

    @property
    def class_names(self) -> list[str]:
        return list(self.contract.class_names)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> CBDEnsemble:
        """Load a model directory, or the MLflow pyfunc directory :func:`log_model` wrote.

        Args:
            path: the folder with ``contract.json`` or with MLflow's ``MLmodel``.
            device: torch device for inference (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

        Raises:
            ModelError: a device that cannot be used, not a model directory, a member file
                that is missing, is not a plain tensor dict, or does not fit its config.
        """
        import torch

        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:  # a bad name, or no CUDA in this torch
            raise ModelError(f"device {device!r} cannot be used here ({_first_line(exc)}); use "
                             f"cpu or an available cuda device") from None
        model_dir = find_model_dir(path)
        contract = ModelContract.read(model_dir)
        members: list[Any] = []
        configs: list[ExperimentConfig | None] = []
        for i, entry in enumerate(contract.members):
            if entry.get("kind", CBD) == MINIROCKET:
                members.append(load_baseline(model_dir, contract, i))
                configs.append(None)
                continue
            cfg, clf = load_member(model_dir, contract, i)
            members.append(clf.to(device))
            configs.append(cfg)
        return cls(contract=contract, members=members, device=device, configs=configs,
                   weights=member_weights(contract))

    def check_input(self, x: Any, *, where: Callable[[int], str] | None = None) -> np.ndarray:
        """Validate raw series and fit them to the contract's ``[C, L]``.

        Series of another length are fitted by the contract's policy, as the training series
        were (:func:`cbdtune.data._lengths.to_length`): ``pad`` extends a shorter series with
        each channel's last value and cuts a longer one to its first ``L`` steps; ``resample``
        linearly interpolates any length >= 2 to ``L``.

        Args:
            x: real numbers [N, C, L_in], or a sequence of [C, L_i] arrays (lengths may differ).
            where: names series ``i`` in messages (default ``"series i"``), e.g. ``file:line``.

        Returns:
            float32 [N, C, L], C-contiguous.

        Raises:
            InputError: not real numbers (complex ones included), not [N, C, L], no series,
                another channel count, NaN or infinite values (how many, and the first one's
                position), values too large for the model's float32 arithmetic, or a series
                too short for the policy.
        """
        where = where or (lambda i: f"series {i}")
        cases = _as_cases(x, self.contract)
        c = self.contract.in_channels
        for i, case in enumerate(cases[:1] if isinstance(cases, np.ndarray) else cases):
            if case.shape[0] != c:
                what = "input" if isinstance(cases, np.ndarray) else where(i)
                raise InputError(f"{what}: {case.shape[0]} channels, but the model takes {c} "
                                 f"(trained on {self.contract.dataset}, input "
                                 f"{self.contract.input_shape}); give series with {c} channels")
        _check_finite(cases, where)
        _check_magnitude(cases, where, self.contract.max_magnitude)
        if isinstance(cases, np.ndarray) and cases.shape[2] == self.contract.seq_len:
            return np.ascontiguousarray(cases, dtype=np.float32)  # the common case
        return self._fit_lengths(cases, where)

    def _fit_lengths(self, cases: np.ndarray | list[np.ndarray],
                     where: Callable[[int], str]) -> np.ndarray:
        length, policy = self.contract.seq_len, self.contract.length_policy
        shortest = 2 if policy == "resample" else 1
        out = np.empty((len(cases), self.contract.in_channels, length), dtype=np.float32)
        for i, case in enumerate(cases):
            if case.shape[1] < shortest:
                raise InputError(f"{where(i)}: {case.shape[1]} time step(s), too few to "
                                 f"{policy} to {length}; give series of at least {shortest} "
                                 f"steps")
            out[i] = to_length(case, length, policy)  # type: ignore[arg-type]
        return out

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities, float64 [N, K]: the weighted mean over members of each one's
        softmax (the contract's weights; equal without them).

        Args:
            x: raw series as :meth:`check_input` takes them.

        Raises:
            InputError: input the model cannot take (see :meth:`check_input`).
        """
        import torch

        x = self.check_input(x)
        weights = self.weights or [1.0 / len(self.members)] * len(self.members)
        out = np.zeros((len(x), len(self.contract.class_names)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(x), BATCH_SIZE):
                chunk = x[start:start + BATCH_SIZE]
                batch = torch.from_numpy(chunk).to(self.device)
                for m, w in zip(self.members, weights, strict=True):
                    if isinstance(m, torch.nn.Module):  # (B, K) softmax, averaged in float64
                        p = m(batch).float().softmax(dim=-1).double().cpu().numpy()
                    else:  # a MiniRocket member: its temperature-scaled softmax
                        p = m.predict_proba(chunk)
                    out[start:start + len(chunk)] += w * p
        return out

    def predict(self, x: Any) -> list[str]:
        """The most probable class name of each series."""
        return [self.contract.class_names[k] for k in self.predict_proba(x).argmax(axis=1)]

    def predict_frame(self, x: Any) -> Any:
        """A pandas DataFrame: ``label`` and one ``prob_<class name>`` column per class."""
        import pandas as pd

        proba = self.predict_proba(x)
        names = self.contract.class_names
        frame = pd.DataFrame(proba, columns=[f"prob_{c}" for c in names])
        frame.insert(0, "label", [names[k] for k in proba.argmax(axis=1)])
        return frame


def find_model_dir(path: str | Path) -> Path:
    """The model directory itself, or the one inside an MLflow pyfunc directory (``MLmodel``).

    Raises:
        ModelError: neither ``contract.json`` nor an ``MLmodel`` naming the model's artifacts.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: no such directory; give a model directory or a models:/ or "
                         f"runs:/ URI")
    if (path / CONTRACT_FILE).is_file() or not (path / "MLmodel").is_file():
        return path  # ModelContract.read reports a folder that is neither
    try:
        mlmodel = yaml.safe_load((path / "MLmodel").read_text()) or {}
        rel = mlmodel["flavors"]["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise ModelError(f"{path}: an MLflow model, but not one cbdtune logged (no "
                         f"'{ARTIFACT_KEY}' artifact); give a model logged by "
                         f"cbdtune.serving.log_model") from None
    inside = (path / str(rel)).resolve()
    if not inside.is_relative_to(path.resolve()):
        raise ModelError(f"{path}: MLmodel names {rel!r} as the model's artifacts, outside the "
                         f"MLflow model folder; give a model logged by cbdtune.serving.log_model")
    return path / str(rel)


def _as_cases(x: Any, contract: ModelContract) -> np.ndarray | list[np.ndarray]:
    """float64 [N, C, L] when all series share a length, else a list of [C, L_i]."""
    hint = f"the model takes {contract.input_shape} (a batch of series, channels, time steps)"
    try:
        arr = _real(x, "input", hint)
    except (TypeError, ValueError):
        if not isinstance(x, (list, tuple)):
            raise InputError(f"input of type {type(x).__name__} is not an array of numbers; "
                             f"{hint}") from None
        arr = None  # a ragged list: series of different lengths
    if arr is not None:
        if arr.ndim != 3 or 0 in arr.shape[1:]:
            raise InputError(f"input has shape {list(arr.shape)}, but {hint}; for one series "
                             f"of shape [C, L] use x[None]")
        if len(arr) == 0:
            raise InputError(f"input holds no series; {hint}")
        return arr
    cases = []
    for i, case in enumerate(x):
        try:
            case = _real(case, f"series {i}", hint)
        except (TypeError, ValueError):
            raise InputError(f"series {i} is not an array of numbers; {hint}") from None
        if case.ndim != 2 or 0 in case.shape:
            raise InputError(f"series {i} has shape {list(case.shape)}, but each series must be "
                             f"[C, L] with C, L >= 1; {hint}")
        cases.append(case)
    if not cases:
        raise InputError(f"input holds no series; {hint}")
    return cases


def _real(x: Any, what: str, hint: str) -> np.ndarray:
    """``x`` as float64; complex numbers are refused (a cast would drop the imaginary part).

    Raises:
        InputError: complex input. TypeError, ValueError: not numbers, or ragged.
    """
    arr = np.asarray(x)
    if arr.dtype == object:  # e.g. numbers of mixed Python types: float() decides (or raises)
        arr = np.asarray(x, dtype=np.float64)
    if np.iscomplexobj(arr):
        raise InputError(f"{what} holds complex numbers; the model takes real series ({hint}): "
                         f"pass the real part, the magnitude, or both as separate channels")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_magnitude(cases: np.ndarray | list[np.ndarray], where: Callable[[int], str],
                     limit: float) -> None:
    """Raise on a value too large for the model's float32 arithmetic, naming the first one."""
    for i, case in enumerate(cases):
        big = np.abs(case) > limit
        if big.any():
            c, t = (int(v[0]) for v in np.nonzero(big))
            beyond = "float32's maximum" if abs(case[c, t]) > np.finfo(np.float32).max else \
                "what the model's float32 arithmetic holds"
            raise InputError(f"{where(i)}: channel {c}, step {t} (0-based) is {case[c, t]:.3g}, "
                             f"too large for float32 (beyond {beyond}; this model takes "
                             f"|x| <= {limit:.3g}); rescale the series, e.g. to other units")


def _check_finite(cases: np.ndarray | list[np.ndarray], where: Callable[[int], str]) -> None:
    """Raise on NaN or inf, naming the first one and counting all of them."""
    if isinstance(cases, np.ndarray):
        bad = ~np.isfinite(cases)  # (N, C, L)
        per_series = bad.sum(axis=(1, 2))
    else:
        bad = None
        per_series = np.array([int((~np.isfinite(case)).sum()) for case in cases])
    total = int(per_series.sum())
    if not total:
        return
    i = int(np.flatnonzero(per_series)[0])
    first = bad[i] if bad is not None else ~np.isfinite(cases[i])
    c, t = (int(v[0]) for v in np.nonzero(first))
    more = "" if total == 1 else (f" (the first of {total} such values, in "
                                  f"{np.count_nonzero(per_series)} series)")
    raise InputError(f"{where(i)}: channel {c}, step {t} (0-based) is NaN or infinite{more}; the "
                     f"model takes complete series: fill the gaps (e.g. interpolate) or drop "
                     f"those series")


# ---- MLflow -------------------------------------------------------------------------------------


def model_signature(contract: ModelContract) -> Any:
    """float32 tensor input (-1, C, -1) -> columns ``label`` and ``prob_<class>``.

    The length is free (-1): the served model fits other lengths by the contract's policy, as
    ``cbdtune.predict`` does (:meth:`CBDEnsemble.check_input`).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, contract.in_channels, -1))])
    outputs = Schema([ColSpec("string", "label"),
                      *(ColSpec("double", f"prob_{c}") for c in contract.class_names)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(tracking_uri: str, run_id: str, model_dir: str | Path, *, registered_name: str,
              input_example: np.ndarray, name: str = "model") -> str:
    """Log a model directory to an existing MLflow run and register it as a new version.

    The pyfunc model is logged *from code* (:data:`PYFUNC_CODE`), with the model directory as
    its artifact ``cbd_model``, a signature (float32 tensor (-1, C, any length) in; ``label``
    and ``prob_<class>`` out) and ``input_example``. The logged model is created in the run's
    experiment and linked to the run; the run's status is not touched. MLflow's global tracking
    and registry URIs are set for the call and put back after it.

    Args:
        tracking_uri: MLflow tracking URI (also used as the registry URI).
        run_id: the run the model belongs to (it must exist).
        model_dir: a directory :func:`save_model` wrote.
        registered_name: the registered model, e.g. ``cbdtune-gesture``; one new version per call.
        input_example: float32 [n, C, L] raw series (a few are enough; n >= 1).
        name: the logged model's name.

    Returns:
        The registered version, e.g. ``"3"``.

    Raises:
        ModelError: ``model_dir`` is not a model directory, or MLflow refuses (unknown run...).
        InputError: ``input_example`` is not [n, C, L].
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    contract = ModelContract.read(model_dir)
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if example.ndim != 3 or example.shape[1:] != (contract.in_channels, contract.seq_len) \
            or len(example) == 0:
        raise InputError(f"input_example has shape {list(example.shape)}, but the model takes "
                         f"{contract.input_shape}; pass a few raw series of the dataset")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
        logged = client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id,
            tags={"cbdtune.dataset": contract.dataset,
                  "cbdtune.members": str(len(contract.members))})
        with using_mlflow(tracking_uri):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(PYFUNC_CODE),
                artifacts={ARTIFACT_KEY: str(Path(model_dir).resolve())},
                signature=model_signature(contract), input_example=example,
                pip_requirements=pip_requirements(), registered_model_name=registered_name,
                model_id=logged.model_id)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except MlflowException as exc:
        raise ModelError(f"log_model: MLflow at {tracking_uri} refused ({_first_line(exc)}); "
                         f"check the run id {run_id} and the tracking URI") from None
    return str(info.registered_model_version)


def pip_requirements() -> list[str]:
    """What the serving environment needs; MLflow adds its own pin.

    Given explicitly so MLflow does not infer them (it would load the model in a subprocess).
    cbdtune is not on PyPI: where a model is served, install it from its repository first
    (``pip install <repo>``), or serve with ``--env-manager local`` from an environment that
    has it.
    """
    import torch

    return [f"cbdtune=={__version__}", f"torch>={torch.__version__.split('+')[0]}"]


@contextlib.contextmanager
def using_mlflow(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking and registry URIs at ``uri``; restore them after.

    Needed where MLflow reads the global URIs whatever it is given: ``log_model`` registers
    through them, and resolving ``models:/NAME/VERSION`` (MLflow 3.17,
    ``ModelsArtifactRepository._get_model_uri_infos``) ignores a ``registry_uri`` argument.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # None unsets it (and resets the tracer provider)
        registry_utils._registry_uri = saved[1]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


__all__ = [
    "ARTIFACT_KEY",
    "CBDEnsemble",
    "InputError",
    "ModelContract",
    "ModelError",
    "find_model_dir",
    "log_model",
    "model_signature",
    "pip_requirements",
    "save_model",
    "using_mlflow",
]
