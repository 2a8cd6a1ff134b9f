"""Training: the task-aligned assigner, the YOLO-NAS loss, EMA and the engine (train_one_epoch, evaluate, fit)."""
