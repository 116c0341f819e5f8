"""Dataset analysis: how much a dataset's context predicts its emotions (``ccim bias-report``)."""
