"""A saved model in MLflow: logged as a pyfunc model *from code*, registered as a new version.

:func:`log_model` logs a model directory with ``_pyfunc_model.py`` as the model's code, so
that loading it never unpickles an object; :func:`using_mlflow` points MLflow's global URIs at
one store for the calls that read them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import __version__
from cbdtune.serving.contract import InputError, ModelContract
from cbdtune.serving.folder import ARTIFACT_KEY, ModelError, first_line

PYFUNC_CODE = Path(__file__).with_name("_pyfunc_model.py")  # MLflow's models-from-code file


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
        raise ModelError(f"log_model: MLflow at {tracking_uri} refused ({first_line(exc)}); "
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
        # None unsets it (and resets the tracer provider); MLflow's hint says str | Path only.
        mlflow.set_tracking_uri(saved[0])  # type: ignore[arg-type]
        registry_utils._registry_uri = saved[1]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
