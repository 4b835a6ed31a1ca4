"""mmnewsrec: multimodal news recommendation on MIND-format data."""

__version__ = "0.1.0"
