"""MLflow's models-from-code file for a cbdtune model (logged by :func:`cbdtune.serving.log_model`).

MLflow runs this file when it loads the model (``mlflow.pyfunc.load_model``, ``mlflow models
serve``) instead of unpickling a Python object; the weights are then read by
:meth:`CBDEnsemble.load` with ``torch.load(weights_only=True)``. cbdtune must be importable
wherever the model is loaded. See https://mlflow.org/docs/latest/ml/model/models-from-code/.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from cbdtune.serving import ARTIFACT_KEY, CBDEnsemble, InputError


class CBDPyfuncModel(PythonModel):
    """Raw series [N, C, L_in] -> DataFrame with ``label`` and ``prob_<class>`` columns.

    Any length ``L_in``: the signature leaves it free, and series are fitted to the model's
    length by the contract's policy exactly as ``cbdtune.predict`` fits them
    (:meth:`CBDEnsemble.check_input`: ``pad`` pads a shorter series and cuts a longer one,
    ``resample`` interpolates). Series of different lengths go in separate requests (a tensor
    has one length); ``cbdtune.predict`` reads them from one ``.ts`` file.
    """

    def load_context(self, context: PythonModelContext) -> None:
        self.ensemble = CBDEnsemble.load(context.artifacts[ARTIFACT_KEY])

    # ``np.ndarray`` is what the signature's tensor input delivers (MLflow does no type-hint
    # validation for it).
    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self.ensemble.predict_frame(model_input)
        except InputError as exc:  # the scoring server answers 400 with the message
            raise MlflowException.invalid_parameter_value(str(exc)) from None


mlflow.models.set_model(CBDPyfuncModel())
