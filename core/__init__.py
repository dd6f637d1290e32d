"""Library behind the pipeline's stage scripts: one module per concern."""
