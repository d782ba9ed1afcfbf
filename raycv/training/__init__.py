"""Distributed training with Ray Train: the loop (:mod:`raycv.training.loop`), data feeding, checkpoints,
the run directory and its model card."""
