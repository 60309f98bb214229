"""batchrun: run large batches of image-to-video jobs on RunComfy's Model API."""

__version__ = "0.1.0"
