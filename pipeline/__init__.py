"""Dogs vs. Cats under DVC and MLflow: one module per pipeline stage, plus the shared pieces."""

from pipeline.process import quiet_tensorflow_logs

# Here, before any module of the package imports TensorFlow, which reads it once.
quiet_tensorflow_logs()
