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

The ensemble's probability is the mean over members of each member's softmax (one member is an
ensemble of one). :func:`log_model` logs a directory to MLflow as a pyfunc model *from code*
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
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import __version__
from cbdtune.config import CbdtuneError, ExperimentConfig
from cbdtune.data._lengths import pad_series, resample_series

FORMAT_VERSION = 1
CONTRACT_FILE = "contract.json"
ARTIFACT_KEY = "cbd_model"  # the model directory's name among the pyfunc model's artifacts
BATCH_SIZE = 256
NORMALISATION = ("inputs are raw series: per-series, per-channel instance normalisation (mean 0, "
                 "std 1 over time) is inside the model, so do not normalise them yourself")
PYFUNC_CODE = Path(__file__).with_name("_pyfunc_model.py")  # MLflow's models-from-code file

# One trained member: its config, its ``CBDClassifier.state_dict()``, free-form metadata.
Member = tuple[ExperimentConfig, dict[str, Any], dict[str, Any]]


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

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelContract:
        """Read ``<model_dir>/contract.json``.

        Raises:
            ModelError: no such file, not JSON, a newer format, or missing fields.
        """
        path = Path(model_dir) / CONTRACT_FILE
        if not path.is_file():
            raise ModelError(f"{model_dir}: not a cbdtune model directory (no {CONTRACT_FILE}); "
                             f"give the folder save_model wrote or an MLflow model URI")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: cannot be read as JSON ({exc}); save the model again") \
                from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelError(f"{path}: format_version {version!r} is not one this cbdtune "
                             f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade cbdtune")
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - set(raw))
        if missing:
            raise ModelError(f"{path}: missing {', '.join(missing)}; save the model again")
        return cls(**{k: v for k, v in raw.items() if k in names})


# ---- saving -------------------------------------------------------------------------------------


def save_model(path: str | Path, members: Sequence[Member], *, class_names: Sequence[str],
               dataset: str, overwrite: bool = False) -> Path:
    """Write a model directory (module docstring) for one or more trained members.

    The directory is written under a temporary name next to ``path`` and renamed into place, so
    a crash never leaves half a model at ``path``.

    Args:
        path: the directory to create.
        members: ``(config, CBDClassifier.state_dict(), metadata)`` per member; every config has
            ``model.in_channels``, ``model.seq_len`` and ``model.num_classes`` set, the same for
            all. Metadata must be JSON-serialisable (other values are stored as strings).
        class_names: the dataset's class names, index = class; ``len == model.num_classes``.
        dataset: the dataset's name, recorded in the contract.
        overwrite: replace an existing directory at ``path`` (else it is an error).

    Returns:
        ``path``.

    Raises:
        ModelError: no members, members that disagree on shape, class names that do not match,
            a state_dict that does not fit its config, or ``path`` exists without ``overwrite``.
    """
    import torch

    path = Path(path)
    first = _check_members(members, class_names)
    if path.exists() and not overwrite:
        raise ModelError(f"{path}: already exists; remove it, choose another path or pass "
                         f"overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model is meant to be read by others
    try:
        entries = []
        for i, (cfg, state, meta) in enumerate(members):
            # "_orig_mod." is what torch.compile puts in front of every key.
            state = {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in state.items()}
            _build_classifier(cfg, state, where=f"member {i}")  # fails now, not at load time
            torch.save(state, tmp / f"member_{i}.pt")
            entries.append({"file": f"member_{i}.pt", "seed": cfg.train.seed,
                            "config": cfg.to_dict(), "metadata": dict(meta)})
        contract = ModelContract(dataset=dataset, in_channels=first.model.in_channels,
                                 seq_len=first.model.seq_len,
                                 length_policy=first.data.length_policy,
                                 class_names=[str(c) for c in class_names], members=entries)
        (tmp / CONTRACT_FILE).write_text(contract.to_json())
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_members(members: Sequence[Member], class_names: Sequence[str]) -> ExperimentConfig:
    if not members:
        raise ModelError("save_model: no members; give at least one (config, state_dict, meta)")
    first = members[0][0]
    key = (first.model.in_channels, first.model.seq_len, first.model.num_classes,
           first.data.length_policy)
    for i, (cfg, _, _) in enumerate(members):
        other = (cfg.model.in_channels, cfg.model.seq_len, cfg.model.num_classes,
                 cfg.data.length_policy)
        if other != key:
            raise ModelError(f"save_model: member {i} has (in_channels, seq_len, num_classes, "
                             f"length_policy) = {other} but member 0 has {key}; an ensemble's "
                             f"members must share them")
    if len(class_names) != first.model.num_classes or len(set(class_names)) != len(class_names):
        raise ModelError(f"save_model: {len(class_names)} class names {list(class_names)[:10]} "
                         f"for model.num_classes={first.model.num_classes}; give the dataset's "
                         f"class names, one distinct name per class")
    return first


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


def _build_classifier(cfg: ExperimentConfig, state: dict[str, Any], *, where: str) -> Any:
    """A ``CBDClassifier`` for ``cfg`` with ``state`` loaded (strict), in eval mode."""
    from cbdtune.model import CBDClassifier, build_head, build_model

    model = build_model(cfg.model)
    clf = CBDClassifier(model, build_head(cfg.model, model.num_tokens,
                                          ridge=cfg.train.classifier == "ridge"))
    try:
        clf.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelError(f"{where}: the weights do not fit the model its config builds "
                         f"({reason}); save the state_dict of the classifier that config "
                         f"trained") from None
    return clf.eval()


# ---- loading and predicting ---------------------------------------------------------------------


@dataclass
class CBDEnsemble:
    """The softmax average of one or more trained classifiers, with the input contract.

    Build it with :meth:`load`. Inputs are raw series; see :meth:`check_input` for what is
    accepted and how other lengths are fitted.
    """

    contract: ModelContract
    members: list[Any]  # CBDClassifier, eval mode, on ``device``
    device: str = "cpu"
    configs: list[ExperimentConfig] = field(default_factory=list)

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
        members, configs = [], []
        for i, entry in enumerate(contract.members):
            where = f"{model_dir / CONTRACT_FILE}: member {i}"
            try:
                cfg = ExperimentConfig.from_dict(entry["config"], where=where)
            except CbdtuneError as exc:
                raise ModelError(f"{exc}; the model was saved by cbdtune "
                                 f"{contract.cbdtune_version}, this is {__version__}") from None
            file = model_dir / str(entry.get("file", ""))
            try:
                state = torch.load(file, weights_only=True, map_location="cpu")
            except Exception as exc:  # torch raises pickle, zip, EOF and OS errors here
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                raise ModelError(f"{where}: {file.name} does not load as a tensor dict "
                                 f"({type(exc).__name__}: {reason}); save the model again") \
                    from None
            members.append(_build_classifier(cfg, state, where=where).to(device))
            configs.append(cfg)
        return cls(contract=contract, members=members, device=device, configs=configs)

    def check_input(self, x: Any, *, where: Callable[[int], str] | None = None) -> np.ndarray:
        """Validate raw series and fit them to the contract's ``[C, L]``.

        Series of another length are fitted by the contract's policy: ``pad`` extends a shorter
        series with each channel's last value (a longer one is an error); ``resample`` linearly
        interpolates any length >= 2 to ``L``.

        Args:
            x: float array [N, C, L_in], or a sequence of [C, L_i] arrays (lengths may differ).
            where: names series ``i`` in messages (default ``"series i"``), e.g. ``file:line``.

        Returns:
            float32 [N, C, L], C-contiguous.

        Raises:
            InputError: not numbers, not [N, C, L], no series, another channel count, NaN or
                infinite values (how many, and the first one's position), or a length the
                policy cannot fit.
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
        if isinstance(cases, np.ndarray) and cases.shape[2] == self.contract.seq_len:
            return np.ascontiguousarray(cases, dtype=np.float32)  # the common case
        return self._fit_lengths(cases, where)

    def _fit_lengths(self, cases: np.ndarray | list[np.ndarray],
                     where: Callable[[int], str]) -> np.ndarray:
        length, policy = self.contract.seq_len, self.contract.length_policy
        shortest = 2 if policy == "resample" else 1
        out = np.empty((len(cases), self.contract.in_channels, length), dtype=np.float32)
        for i, case in enumerate(cases):
            n = case.shape[1]
            if n == length:
                out[i] = case
            elif n > length and policy == "pad":
                raise InputError(f"{where(i)}: {n} time steps, but the model takes at most "
                                 f"{length} (length_policy pad: shorter series are padded, "
                                 f"longer ones are not cut); cut the series to {length} steps")
            elif n < shortest:
                raise InputError(f"{where(i)}: {n} time step(s), too few to {policy} to "
                                 f"{length}; give series of at least {shortest} steps")
            else:
                fit = pad_series if policy == "pad" else resample_series
                out[i] = fit(case, length)
        return out

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities, float64 [N, K]: the mean over members of each one's softmax.

        Args:
            x: raw series as :meth:`check_input` takes them.

        Raises:
            InputError: input the model cannot take (see :meth:`check_input`).
        """
        import torch

        x = self.check_input(x)
        out = np.empty((len(x), len(self.contract.class_names)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(x), BATCH_SIZE):
                batch = torch.from_numpy(x[start:start + BATCH_SIZE]).to(self.device)
                probs = [m(batch).float().softmax(dim=-1) for m in self.members]  # (B, K) each
                out[start:start + len(batch)] = (
                    torch.stack(probs).double().mean(dim=0).cpu().numpy())  # (M, B, K) -> (B, K)
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
    return path / rel


def _as_cases(x: Any, contract: ModelContract) -> np.ndarray | list[np.ndarray]:
    """float64 [N, C, L] when all series share a length, else a list of [C, L_i]."""
    hint = f"the model takes {contract.input_shape} (a batch of series, channels, time steps)"
    try:
        arr = np.asarray(x, dtype=np.float64)
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
            case = np.asarray(case, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"series {i} is not an array of numbers; {hint}") from None
        if case.ndim != 2 or 0 in case.shape:
            raise InputError(f"series {i} has shape {list(case.shape)}, but each series must be "
                             f"[C, L] with C, L >= 1; {hint}")
        cases.append(case)
    if not cases:
        raise InputError(f"input holds no series; {hint}")
    return cases


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
    """float32 tensor input (-1, C, L) -> columns ``label`` and ``prob_<class>``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, contract.in_channels,
                                                       contract.seq_len))])
    outputs = Schema([ColSpec("string", "label"),
                      *(ColSpec("double", f"prob_{c}") for c in contract.class_names)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(tracking_uri: str, run_id: str, model_dir: str | Path, *, registered_name: str,
              input_example: np.ndarray, name: str = "model") -> str:
    """Log a model directory to an existing MLflow run and register it as a new version.

    The pyfunc model is logged *from code* (:data:`PYFUNC_CODE`), with the model directory as
    its artifact ``cbd_model``, a signature (float32 tensor (-1, C, L) in; ``label`` and
    ``prob_<class>`` out) and ``input_example``. The logged model is created in the run's
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
