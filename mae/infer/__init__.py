"""Using a trained model on the user's data: embeddings of a data source, segmentation and detection
predictions."""

import sys


def read_or_skip(path, in_chans: int):
    """An input image (C, H, W in the loader's scale), or None when it does not read: then it is named on stderr,
    for the caller to skip and count."""
    from mae.data.segmentation import BadPair, read_image_file

    try:
        return read_image_file(str(path), in_chans)
    except BadPair as e:
        print(f"skipping {e}", file=sys.stderr)
        return None
