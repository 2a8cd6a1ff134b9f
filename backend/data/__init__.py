"""Datasets: COCO and YOLO readers, the synthetic generator, albumentations pipelines and samplers."""
