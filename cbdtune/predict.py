"""Classify series with a saved model: ``python -m cbdtune.predict --model URI --input FILE``.

``--model`` is ``models:/cbdtune-gesture/latest`` (a registered version, resolved in
``--mlflow-uri``), ``runs:/<run_id>/model``, or a local folder: the model directory
:func:`cbdtune.serving.save_model` wrote or the MLflow model directory around it. ``--input`` is
a UEA/UCR ``.ts`` file (its labels are compared by name with the model's classes), a ``.npy``
array [N, C, L], or a dataset name (its test split; ``--data-dir`` as for the other commands).

Writes CSV (``--output``, default stdout): ``index,label,prob_<class>...`` and, when the input
has labels, ``true_label``, with ``accuracy: 0.xxxx (n/N)`` on stderr. The model is downloaded
and read directly (:class:`cbdtune.serving.CBDEnsemble`), without building an MLflow
environment.

Example:
    python -m cbdtune.predict --model models:/cbdtune-gesture/latest --input gesture
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import _cli
from cbdtune.config import DataConfig
from cbdtune.serving import CBDEnsemble, InputError, ModelError, using_mlflow

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/, runs:/, s3://, mlflow-artifacts:/


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbdtune.predict",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="models:/NAME/VERSION (or /latest, @alias), runs:/RUN_ID/model, or a "
                        "local model folder")
    p.add_argument("--input", required=True,
                   help="a .ts file, a .npy array [N, C, L], or a dataset name (its test split)")
    p.add_argument("--output", help="CSV file to write (default: stdout)")
    p.add_argument("--mlflow-uri", help="tracking URI for models:/ and runs:/ "
                                        "(default: sqlite:///./mlflow.db)")
    p.add_argument("--data-dir", help="local dataset folder (default: $CBDTUNE_DATA_DIR, cache)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(args: argparse.Namespace) -> int:
    kind = input_kind(args.input)  # a missing file or a bad extension fails before any download
    with tempfile.TemporaryDirectory(prefix="cbdtune-predict-") as tmp:
        model_dir = fetch_model(args.model, args.mlflow_uri, Path(tmp))
        ensemble = CBDEnsemble.load(model_dir, device=args.device)
    x, labels, where = read_input(args.input, kind, ensemble, data_dir=args.data_dir)
    proba = ensemble.predict_proba(ensemble.check_input(x, where=where))
    names = ensemble.class_names
    truth = None if labels is None else to_class_indices(labels, names, args.input)
    if args.output:
        with open(args.output, "w", newline="") as handle:
            write_csv(handle, proba, names, truth)
    else:
        write_csv(sys.stdout, proba, names, truth)
    if truth is not None:
        correct = int((proba.argmax(axis=1) == truth).sum())
        print(f"accuracy: {correct / len(truth):.4f} ({correct}/{len(truth)})", file=sys.stderr)
    return 0


def input_kind(spec: str) -> str:
    """``"ts"``, ``"npy"`` or ``"dataset"`` for an ``--input`` value.

    Raises:
        InputError: a ``.ts``/``.npy`` path that is not a file, or a file of another type.
    """
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".ts", ".npy"):
        if not path.is_file():
            raise InputError(f"--input {spec}: file not found; check the path")
        return suffix[1:]
    if path.is_file() or (suffix and not path.is_dir()):
        raise InputError(f"--input {spec}: unsupported file type {suffix or '(none)'!r}; give a "
                         f".ts file, a .npy array [N, C, L] or a dataset name")
    return "dataset"


def fetch_model(spec: str, tracking_uri: str | None, dst: Path) -> Path:
    """A local folder as is; a ``models:/`` or ``runs:/`` URI downloaded into ``dst``.

    Args:
        spec: the ``--model`` value.
        tracking_uri: ``--mlflow-uri``; ``None`` is ``sqlite:///<cwd>/mlflow.db``.
        dst: an empty folder for the download.

    Raises:
        ModelError: a local path that does not exist, a tracking store that does not exist, or
            a URI MLflow cannot resolve (unknown name, version or run).
    """
    if not _URI.match(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ModelError(f"--model {spec}: no such folder, and not a models:/ or runs:/ "
                             f"URI; give e.g. models:/cbdtune-gesture/latest or a model folder")
        return path
    import mlflow  # here: a local folder needs neither MLflow nor the tracking module (Ray)

    from cbdtune import tracking

    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    _check_store(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        with using_mlflow(tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=spec, dst_path=str(dst), tracking_uri=tracking_uri,
                registry_uri=tracking_uri))
    except (MlflowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:300]
        known = _registered_names(tracking_uri) if spec.startswith("models:/") else ""
        raise ModelError(f"--model {spec}: not found in {tracking_uri} ({reason}){known}; check "
                         f"the name and version, or pass --mlflow-uri") from None


def _check_store(uri: str) -> None:
    """A sqlite store must exist: MLflow would otherwise create an empty one and then fail."""
    from cbdtune import tracking

    tracking.check_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser()
        if not db.is_file():
            raise ModelError(f"--mlflow-uri {uri}: no MLflow store at {db}; pass the --mlflow-uri "
                             f"the search logged to")


def _registered_names(uri: str) -> str:
    try:
        from mlflow import MlflowClient

        names = [m.name for m in MlflowClient(uri, registry_uri=uri).search_registered_models(
            max_results=20)]
    except Exception:  # only a hint for the message; the real error is reported anyway
        return ""
    return f"; registered models there: {', '.join(names)}" if names else \
        "; no model is registered there"


def read_input(spec: str, kind: str, ensemble: CBDEnsemble, *, data_dir: str | None
               ) -> tuple[Any, list[str] | None, Callable[[int], str]]:
    """``(series, label names or None, where)`` from a ``.ts`` file, a ``.npy`` or a dataset.

    ``where(i)`` names series ``i`` in error messages (``file:line`` for ``.ts``).

    Raises:
        InputError: a ``.npy`` that is not a plain numeric array (empty, cut, pickled).
        DataError: a ``.ts`` file or dataset that does not read (with file and line).
    """
    if kind == "npy":
        try:
            x = np.load(spec, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty or cut file
            raise InputError(f"--input {spec}: not a plain .npy array ({_one_line(exc)}); save "
                             f"it with numpy.save(path, x) for a float array x [N, C, L]") \
                from None
        return x, None, lambda i: f"{spec}: series {i}"
    if kind == "ts":
        from cbdtune.data._readers import read_ts

        raw = read_ts(Path(spec))
        cases = [_drop_trailing_nan(case) for case in raw.cases]
        return cases, [raw.class_names[k] for k in raw.labels], raw.where
    from cbdtune.data import load_dataset

    cfg = DataConfig(dataset=spec, data_dir=data_dir,
                     length_policy=ensemble.contract.length_policy)
    ds = load_dataset(cfg, seed=0)
    if ds.test is None or len(ds.test) == 0:
        raise InputError(f"--input {spec}: {ds.name} has no test split; give a .ts or .npy file")
    return ds.test.x, [ds.class_names[k] for k in ds.test.y], \
        lambda i: f"{ds.name} test series {i}"


def _drop_trailing_nan(case: np.ndarray) -> np.ndarray:
    """UEA pads short series with trailing NaN (as ``cbdtune.data`` does, it is not data)."""
    has_value = np.isfinite(case).any(axis=0)  # (L,)
    if not has_value.any():
        return case  # all NaN: check_input reports it
    return case[:, : case.shape[1] - int(np.argmax(has_value[::-1]))]


def to_class_indices(labels: Sequence[str], class_names: Sequence[str], source: str
                     ) -> np.ndarray:
    """Label names -> indices into the model's classes.

    Raises:
        InputError: a label that is not one of the model's classes.
    """
    index = {name: k for k, name in enumerate(class_names)}
    for i, name in enumerate(labels):
        if name not in index:
            shown = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
            raise InputError(f"--input {source}: series {i} has label {name!r}, which is not a "
                             f"class of the model ({shown}); is it the dataset the model was "
                             f"trained on?")
    return np.array([index[name] for name in labels], dtype=np.int64)


def write_csv(handle: Any, proba: np.ndarray, class_names: Sequence[str],
              truth: np.ndarray | None) -> None:
    """``index,label,prob_<class>...[,true_label]``, one row per series."""
    writer = csv.writer(handle, lineterminator="\n")
    header = ["index", "label", *(f"prob_{c}" for c in class_names)]
    writer.writerow(header + (["true_label"] if truth is not None else []))
    for i, row in enumerate(proba):
        out = [i, class_names[int(row.argmax())], *(f"{p:.8g}" for p in row)]
        if truth is not None:
            out.append(class_names[int(truth[i])])
        writer.writerow(out)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def cli(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar and logs store migrations on stderr; the output here is the
    # CSV and the accuracy line (and an error is one line).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return _cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
