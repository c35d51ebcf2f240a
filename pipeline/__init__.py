"""Dogs vs. Cats under DVC and MLflow: one module per pipeline stage, plus the shared pieces."""
