"""Entry point of the registered model (MLflow "models from code"): MLflow runs this file to build
the pyfunc, so nothing is unpickled when a model is loaded or served. Needs the ``free`` package."""

from mlflow.models import set_model

from free.serving import FewShotMetaLearner

set_model(FewShotMetaLearner())
