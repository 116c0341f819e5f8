"""Trained models applied to new photos: ``predictor.Predictor`` (checkpoint -> probabilities for images + boxes)."""
