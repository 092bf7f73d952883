"""The code MLflow runs to load a Tunery pyfunc (models from code: no pickle in the model)."""

import mlflow

from tunery.mlflow_model import Classifier

mlflow.models.set_model(Classifier())
