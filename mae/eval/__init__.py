"""Evaluation metrics: COCO detection and instance segmentation AP (coco.py)."""
