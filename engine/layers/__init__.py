"""Building blocks shared by all models. Parallelism enters here, never in model files."""
