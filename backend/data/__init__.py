"""Datasets: COCO and YOLO readers, the synthetic generator, the training augmentations and samplers."""
