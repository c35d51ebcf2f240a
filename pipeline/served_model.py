"""What MLflow runs to load a logged photo model (models from code); see `pipeline.serving`.

No stage imports it: `serving.log_photo_model` copies it into each logged model, and MLflow
runs it to load one.
"""

import mlflow

from pipeline.serving import PhotoClassifier

mlflow.models.set_model(PhotoClassifier())
