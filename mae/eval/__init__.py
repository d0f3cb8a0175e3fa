"""Evaluation: metrics (top-k, k-NN, segmentation, COCO), whether data.val can score data.train, figures."""
