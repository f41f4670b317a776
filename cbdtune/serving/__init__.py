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
folder of the model (:func:`cbdtune.serving.members.load_baseline`).

The ensemble's probability is the weighted mean over members of each member's softmax, with the
contract's ``weight`` per member (ensemble selection's, summing to 1), or equal weights when the
contract has none (one member is an ensemble of one). :func:`log_model` logs a directory to MLflow as a pyfunc model *from code*
(``cbdtune/serving/_pyfunc_model.py``), so that loading it never unpickles an object either.

Modules: ``folder`` (reading the folder's files safely, ``ModelError``), ``contract``
(``contract.json``, ``InputError``), ``members`` (CBD and MiniRocket members, checked before
they are built), ``save`` (``save_model``), ``ensemble`` (``CBDEnsemble``), ``mlflow_model``
(``log_model``, ``using_mlflow``). This package re-exports their public names.

Example:
    >>> save_model("out/model", [(cfg, clf.state_dict(), {"run_id": rid})],
    ...            class_names=ds.class_names, dataset=ds.name)  # doctest: +SKIP
    >>> CBDEnsemble.load("out/model").predict(x)  # doctest: +SKIP
    ['1.0', '5.0', ...]
"""

from __future__ import annotations

from cbdtune.serving.contract import InputError, ModelContract
from cbdtune.serving.ensemble import CBDEnsemble
from cbdtune.serving.folder import ARTIFACT_KEY, CONTRACT_FILE, ModelError, find_model_dir
from cbdtune.serving.members import BaselineMember, Member
from cbdtune.serving.mlflow_model import log_model, model_signature, pip_requirements, using_mlflow
from cbdtune.serving.save import save_model

__all__ = [
    "ARTIFACT_KEY",
    "CONTRACT_FILE",
    "BaselineMember",
    "CBDEnsemble",
    "InputError",
    "Member",
    "ModelContract",
    "ModelError",
    "find_model_dir",
    "log_model",
    "model_signature",
    "pip_requirements",
    "save_model",
    "using_mlflow",
]
