"""Using a trained model on the user's data: embeddings of a data source, segmentation and detection
predictions."""
