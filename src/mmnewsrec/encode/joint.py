"""Vision-language encoders: aligned text and image vectors from one model (CLIP, BLIP).

The news vector of a joint encoder is its text vector and image vector fused, so each joint
encoder offers both sides as `NewsEncoder`s sharing one loaded model (`text_side`, `image_side`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmnewsrec.devices import effective_precision, inference, resolve_device
from mmnewsrec.encode.base import dedupe, encode_sorted
from mmnewsrec.encode.image_files import ProcessorImageEncoder

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class Side:
    """One modality of a joint encoder, seen as a `NewsEncoder`."""

    name: str
    dim: int
    encode: Callable[..., Any]


class JointEncoder:
    """Tokenising, batching and image reading shared by CLIP and BLIP; subclasses load the
    model and say how a batch becomes text features and image features."""

    name: str
    dim: int
    max_length: int
    model: Any

    def __init__(self, name_or_path: str):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.processor = AutoImageProcessor.from_pretrained(name_or_path)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(
        self,
        items: Sequence[str],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
    ) -> np.ndarray:
        """(n, dim) float32 text vectors, L2-normalised; identical texts embedded once."""
        unique, inverse = dedupe(items)
        resolved = resolve_device(device)
        self.model.to(resolved)

        def embed(batch: list[str]) -> torch.Tensor:
            tokens = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(resolved)
            return self.text_features(tokens["input_ids"], tokens["attention_mask"])

        with inference(resolved, effective_precision(resolved, precision)):
            vectors = encode_sorted(unique, embed, self.dim, batch_size, desc=f"{self.name} text")
        return vectors[inverse]

    def text_side(self) -> Side:
        return Side(self.name, self.dim, self.encode_texts)

    def image_side(self) -> JointImages:
        return JointImages(self)


class JointImages(ProcessorImageEncoder):
    """The image side of a joint encoder: image vectors in the same space as its text vectors,
    from the same loaded model."""

    def __init__(self, joint: JointEncoder):
        self.joint = joint
        self.name, self.dim, self.model = joint.name, joint.dim, joint.model
        self.processor = joint.processor

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.joint.image_features(pixels)


class ClipEncoder(JointEncoder):
    """CLIP (`CLIPModel`): projected text and image features."""

    def __init__(self, name_or_path: str):
        from transformers import CLIPModel

        super().__init__(name_or_path)
        self.model = CLIPModel.from_pretrained(name_or_path).eval()
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output  # (B, D) projected

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output  # (B, D)


class BlipEncoder(JointEncoder):
    """BLIP. A `BlipForImageTextRetrieval` checkpoint: the image-text contrastive heads
    (CLS token of each tower through `vision_proj` / `text_proj`, as BLIP's retrieval does).
    Any other BLIP checkpoint: `BlipModel` and its projected features."""

    def __init__(self, name_or_path: str):
        from transformers import AutoConfig, BlipForImageTextRetrieval, BlipModel

        super().__init__(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path)
        self.retrieval = "BlipForImageTextRetrieval" in (config.architectures or [])
        model_class = BlipForImageTextRetrieval if self.retrieval else BlipModel
        self.model = model_class.from_pretrained(name_or_path).eval()
        self.dim = int(config.image_text_hidden_size if self.retrieval else config.projection_dim)
        self.max_length = int(config.text_config.max_position_embeddings)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.retrieval:
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out.pooler_output
        out = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.model.text_proj(out.last_hidden_state[:, 0])  # (B, D)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.retrieval:
            return self.model.get_image_features(pixel_values=pixels).pooler_output
        out = self.model.vision_model(pixel_values=pixels)
        return self.model.vision_proj(out.last_hidden_state[:, 0])  # (B, D)


JOINT_ENCODERS: dict[str, type[JointEncoder]] = {"clip": ClipEncoder, "blip": BlipEncoder}


def load_joint_encoder(name_or_path: str) -> JointEncoder:
    """A CLIP or BLIP model by hub id or local path (chosen from its config's model_type)."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in JOINT_ENCODERS:
        raise ValueError(
            f"{name_or_path}: model type {model_type!r} is not a joint encoder "
            f"(supported: {', '.join(JOINT_ENCODERS)})"
        )
    return JOINT_ENCODERS[model_type](name_or_path)
