"""Evaluation: pycocotools COCOeval, per-class AP and PR curves, a confusion matrix and per-image errors."""
