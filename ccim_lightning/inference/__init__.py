"""Inference: a checkpoint's predictions for images and person boxes, and optional person detection."""
