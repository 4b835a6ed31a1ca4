"""encode stage: frozen text, image and joint encoders, fusion, cached news vectors.

Importing this package loads no model library; torch and transformers are imported when an
encoder is built.
"""

from mmnewsrec.encode.base import ImageEncoder, NewsEncoder, TextEncoder
from mmnewsrec.encode.fusion import FUSIONS, Fusion
from mmnewsrec.encode.image import EfficientNetLiteEncoder, HFVisionEncoder, load_image_encoder
from mmnewsrec.encode.joint import BlipEncoder, ClipEncoder, JointEncoder, load_joint_encoder
from mmnewsrec.encode.pipeline import EncodeConfig, EncodeError, encode_store
from mmnewsrec.encode.text import SentenceEncoder
from mmnewsrec.formats.vectors import NewsVectors, VectorsError

__all__ = [
    "BlipEncoder",
    "ClipEncoder",
    "EfficientNetLiteEncoder",
    "EncodeConfig",
    "EncodeError",
    "FUSIONS",
    "Fusion",
    "HFVisionEncoder",
    "ImageEncoder",
    "JointEncoder",
    "NewsEncoder",
    "NewsVectors",
    "SentenceEncoder",
    "TextEncoder",
    "VectorsError",
    "encode_store",
    "load_image_encoder",
    "load_joint_encoder",
]
