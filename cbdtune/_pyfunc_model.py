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

from cbdtune.serving import ARTIFACT_KEY, CBDEnsemble, InputError, ModelContract


class CBDPyfuncModel(PythonModel):
    """Raw series [N, C, L] -> DataFrame with ``label`` and ``prob_<class>`` columns."""

    def load_context(self, context: PythonModelContext) -> None:
        self.ensemble = CBDEnsemble.load(context.artifacts[ARTIFACT_KEY])

    # ``np.ndarray`` is what the signature's tensor input delivers (MLflow does no type-hint
    # validation for it); a DataFrame with one column of [C, L] series works too.
    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self.ensemble.predict_frame(_to_series(model_input, self.ensemble.contract))
        except InputError as exc:  # the scoring server answers 400 with the message
            raise MlflowException.invalid_parameter_value(str(exc)) from None


def _to_series(data: Any, contract: ModelContract) -> Any:
    """A DataFrame with one column of [C, L] series -> a list of [C, L] arrays; else as is."""
    if not isinstance(data, pd.DataFrame):
        return data
    if data.shape[1] != 1:
        raise InputError(f"a DataFrame input needs one column holding a [C, L] series per row, "
                         f"but has {data.shape[1]} columns; the model takes "
                         f"{contract.input_shape}")
    return [np.asarray(cell.tolist() if hasattr(cell, "tolist") else cell, dtype=np.float64)
            for cell in data.iloc[:, 0]]


mlflow.models.set_model(CBDPyfuncModel())
