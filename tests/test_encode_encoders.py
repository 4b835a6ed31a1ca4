"""Encoders on raw inputs: tiny random Hugging Face models saved and loaded by path, and the
shipped all-MiniLM-L6-v2 and EfficientNet-Lite0 loaded for real."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmnewsrec.encode.base import NewsEncoder, dedupe
from mmnewsrec.encode.image import EfficientNetLiteEncoder, HFVisionEncoder, load_image_encoder
from mmnewsrec.encode.image_files import ImageCrop
from mmnewsrec.encode.joint import BlipEncoder, ClipEncoder, load_joint_encoder
from mmnewsrec.encode.text import SentenceEncoder

WORDS = ["the", "a", "news", "sports", "football", "market", "stocks", "rise", "fall", "game"]
WORDS += ["team", "win", "loss", "vote"]
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=40,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
    sep_token_id=3,
)
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
SIZE = {"height": 32, "width": 32}
TITLES = ["the news", "sports game win", "market stocks fall", "the news", "vote"]


def save_tokenizer(folder: Path):
    """A BERT word-piece tokenizer over a tiny vocabulary ([PAD]=0 [CLS]=2 [SEP]=3)."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = save_tokenizer(folder)
    BertModel(BertConfig(vocab_size=len(tokenizer), **TEXT)).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = save_tokenizer(folder)
    text = dict(TEXT, vocab_size=len(tokenizer))
    config = CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=SIZE).save_pretrained(folder)
    return folder


def save_tiny_blip(folder: Path, retrieval: bool) -> Path:
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipModel

    tokenizer = save_tokenizer(folder)
    config = BlipConfig(
        text_config=dict(TEXT, vocab_size=len(tokenizer)),
        vision_config=VISION,
        projection_dim=24,
        image_text_hidden_size=20,
    )
    (BlipForImageTextRetrieval if retrieval else BlipModel)(config).save_pretrained(folder)
    BlipImageProcessor(size=SIZE).save_pretrained(folder)
    return folder


def save_tiny_dinov2(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(**VISION)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=SIZE).save_pretrained(folder)
    return folder


def save_clip_vision_tower(clip: Path, folder: Path) -> Path:
    """The vision tower + projection of the CLIP at `clip`, saved on its own."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    full = CLIPModel.from_pretrained(clip)
    config = full.config.vision_config
    config.projection_dim = full.config.projection_dim
    tower = CLIPVisionModelWithProjection(config)
    tower.vision_model.load_state_dict(full.vision_model.state_dict())
    tower.visual_projection.load_state_dict(full.visual_projection.state_dict())
    tower.save_pretrained(folder)
    CLIPImageProcessor.from_pretrained(clip).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    models = {
        "bert": save_tiny_bert(root / "bert"),
        "clip": save_tiny_clip(root / "clip"),
        "blip-itm": save_tiny_blip(root / "blip-itm", retrieval=True),
        "blip": save_tiny_blip(root / "blip", retrieval=False),
        "dinov2": save_tiny_dinov2(root / "dinov2"),
    }
    models["clip-vision"] = save_clip_vision_tower(models["clip"], root / "clip-vision")
    return models


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Three readable images (jpg, png, odd size), a corrupt file, a truncated jpg, a lost path."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = {}
    for name, shape in [("a.jpg", (60, 80)), ("b.png", (90, 40)), ("c.jpg", (33, 35))]:
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        files[name] = str(root / name)
    (root / "corrupt.jpg").write_bytes(b"this is not an image")
    (root / "truncated.jpg").write_bytes(Path(files["a.jpg"]).read_bytes()[:300])
    files |= {n: str(root / n) for n in ("corrupt.jpg", "truncated.jpg", "lost.jpg")}
    return files


@pytest.fixture(scope="session")
def minilm() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="session")
def efficientnet() -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder()


def processed(processor, paths) -> torch.Tensor:
    return processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")[
        "pixel_values"
    ]


def unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy()


# ------------------------------------------------------------------------------------ shared


def test_dedupe_keeps_first_seen_order_and_maps_back():
    unique, inverse = dedupe(["b", "a", None, "b", None])
    assert unique == ["b", "a", None]
    np.testing.assert_array_equal(inverse, [0, 1, 2, 0, 2])


# -------------------------------------------------------------------------------------- text


def test_plain_hf_text_model_is_mean_pooled_and_normalised(tiny):
    from transformers import AutoModel, AutoTokenizer

    encoder = SentenceEncoder(str(tiny["bert"]))
    vectors = encoder.encode(TITLES, batch_size=2)
    model = AutoModel.from_pretrained(tiny["bert"])
    batch = AutoTokenizer.from_pretrained(tiny["bert"])(TITLES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 32)
    mask = batch["attention_mask"][..., None].float()
    expected = unit((hidden * mask).sum(1) / mask.sum(1))
    assert isinstance(encoder, NewsEncoder) and encoder.dim == 32
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_same_text_same_vector_and_deterministic(tiny):
    encoder = SentenceEncoder(str(tiny["bert"]))
    first = encoder.encode(TITLES, batch_size=2)
    np.testing.assert_array_equal(first[0], first[3])  # "the news" twice: embedded once
    # A fresh model on the same batches runs the same kernels on the same shapes: bit-equal.
    again = SentenceEncoder(str(tiny["bert"])).encode(TITLES, batch_size=2)
    np.testing.assert_array_equal(first, again)
    # Another batch size pads and blocks the matmuls differently: equal to float32 rounding.
    np.testing.assert_allclose(encoder.encode(TITLES), first, rtol=0, atol=1e-6)
    assert encoder.encode([]).shape == (0, 32)


def test_minilm_matches_bare_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from mmnewsrec.encode.text import text_model_path

    bare = SentenceTransformer(text_model_path(minilm.name), device="cpu")
    titles = ["Chiefs win in overtime", "Stocks fall as rates rise", "Chiefs win in overtime"]
    vectors = minilm.encode(titles)
    assert minilm.dim == 384
    np.testing.assert_allclose(vectors, bare.encode(titles, normalize_embeddings=True), atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert vectors[0] @ vectors[1] < 0.5


# ------------------------------------------------------------------------------------- image


def test_efficientnet_lite0_features_and_missing_images(efficientnet, images, caplog):
    paths = [images["a.jpg"], None, images["b.png"], images["corrupt.jpg"], images["a.jpg"]]
    paths += [images["truncated.jpg"], images["lost.jpg"], images["c.jpg"]]
    with caplog.at_level(logging.WARNING):
        vectors, has_image, _ = efficientnet.encode(paths, batch_size=2)
    assert vectors.shape == (8, 1280) and vectors.dtype == np.float32
    np.testing.assert_array_equal(has_image, [1, 0, 1, 0, 1, 0, 0, 1])
    assert not vectors[~has_image].any()
    np.testing.assert_allclose(np.linalg.norm(vectors[has_image], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[4])  # same file, same vector
    warning = caplog.text
    assert "3 image file(s) could not be read" in warning
    assert all(name in warning for name in ("corrupt.jpg", "truncated.jpg", "lost.jpg"))
    again, *_ = efficientnet.encode(paths, batch_size=3)
    np.testing.assert_allclose(again, vectors, atol=1e-6)


def test_efficientnet_preprocessing_and_image_size(efficientnet, images):
    image = Image.open(images["a.jpg"]).convert("RGB")
    pixels = efficientnet.preprocess(image)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    small = EfficientNetLiteEncoder(image_size=160)
    assert small.preprocess(image).shape == (160, 160, 3)
    vectors, has_image, _ = small.encode([images["a.jpg"]])
    assert vectors.shape == (1, 1280) and has_image.all()
    with pytest.raises(ValueError, match="efficientnet-lite0 only"):
        load_image_encoder("facebook/dinov2-small", image_size=160)


def test_efficientnet_sees_colour(efficientnet, tmp_path):
    """Two shades of red are closer to each other than to blue (the features mean something)."""
    paths = []
    for name, rgb in [("red", (200, 30, 30)), ("red2", (180, 40, 50)), ("blue", (30, 40, 200))]:
        Image.new("RGB", (96, 96), rgb).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    v, *_ = efficientnet.encode(paths)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.05


def test_dinov2_gives_the_final_cls_token(tiny, images):
    from transformers import AutoImageProcessor, Dinov2Model

    encoder = load_image_encoder(str(tiny["dinov2"]))
    assert isinstance(encoder, HFVisionEncoder) and encoder.dim == 32
    paths = [images["a.jpg"], None, images["corrupt.jpg"], images["b.png"]]
    vectors, has_image, _ = encoder.encode(paths, batch_size=1)
    np.testing.assert_array_equal(has_image, [1, 0, 0, 1])
    model = Dinov2Model.from_pretrained(tiny["dinov2"]).eval()
    pixels = processed(AutoImageProcessor.from_pretrained(tiny["dinov2"]), paths[::3])
    with torch.no_grad():
        expected = unit(model(pixel_values=pixels).pooler_output)
    np.testing.assert_allclose(vectors[has_image], expected, atol=1e-5)
    assert not vectors[~has_image].any()


def test_clip_vision_tower_and_whole_clip_give_the_clip_image_vectors(tiny, images):
    paths = [images["a.jpg"], images["c.jpg"], None]
    tower = load_image_encoder(str(tiny["clip-vision"]))
    whole = load_image_encoder(str(tiny["clip"]))
    assert isinstance(tower, HFVisionEncoder) and tower.dim == whole.dim == 24
    tower_vectors, has_image, _ = tower.encode(paths)
    whole_vectors, *_ = whole.encode(paths)
    np.testing.assert_allclose(tower_vectors, whole_vectors, atol=1e-5)
    np.testing.assert_array_equal(has_image, [1, 1, 0])


# ------------------------------------------------------------------------------------- joint


def test_clip_text_and_image_features(tiny, images):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    encoder = load_joint_encoder(str(tiny["clip"]))
    assert isinstance(encoder, ClipEncoder) and encoder.dim == 24
    texts = encoder.encode_texts(TITLES, batch_size=2)
    vectors, has_image, _ = encoder.image_side().encode([images["b.png"], None])
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny["clip"])(TITLES, padding=True, return_tensors="pt")
    pixels = processed(AutoImageProcessor.from_pretrained(tiny["clip"]), [images["b.png"]])
    with torch.no_grad():
        text_features = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(texts, unit(text_features), atol=1e-5)
    np.testing.assert_allclose(vectors[:1], unit(image_features), atol=1e-5)
    np.testing.assert_array_equal(has_image, [True, False])
    side = encoder.text_side()
    assert isinstance(side, NewsEncoder) and side.dim == 24


def test_blip_retrieval_vectors_reproduce_its_contrastive_score(tiny, images):
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

    encoder = load_joint_encoder(str(tiny["blip-itm"]))
    assert isinstance(encoder, BlipEncoder) and encoder.retrieval and encoder.dim == 20
    texts = encoder.encode_texts(TITLES[:3])
    vectors, *_ = encoder.image_side().encode([images["a.jpg"], images["b.png"]])
    model = BlipForImageTextRetrieval.from_pretrained(tiny["blip-itm"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny["blip-itm"])(
        TITLES[:3], padding=True, return_tensors="pt"
    )
    pixels = processed(AutoImageProcessor.from_pretrained(tiny["blip-itm"]), [images["a.jpg"]])
    with torch.no_grad():
        score = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixels,
            use_itm_head=False,
        ).itm_score  # (1 image, 3 texts) cosine of the normalised projections
    np.testing.assert_allclose(vectors[:1] @ texts.T, score.numpy(), atol=1e-5)


def test_blip_model_projected_features(tiny, images):
    from transformers import AutoTokenizer, BlipModel

    encoder = load_joint_encoder(str(tiny["blip"]))
    assert isinstance(encoder, BlipEncoder) and not encoder.retrieval and encoder.dim == 24
    texts = encoder.encode_texts(TITLES)
    model = BlipModel.from_pretrained(tiny["blip"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny["blip"])(TITLES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
    np.testing.assert_allclose(texts, unit(expected), atol=1e-5)
    vectors, has_image, _ = encoder.image_side().encode([images["corrupt.jpg"], images["c.jpg"]])
    np.testing.assert_array_equal(has_image, [False, True])
    assert vectors.shape == (2, 24) and not vectors[0].any()


def test_a_vision_only_model_is_not_a_joint_encoder(tiny):
    with pytest.raises(ValueError, match="not a joint encoder"):
        load_joint_encoder(str(tiny["dinov2"]))


def card(path: Path, photo: np.ndarray | None) -> str:
    """A 610 x 195 IM-MIND style card: `photo` (165 x 200) in the box 15, 15, 215, 180 (white
    if None) and dark 'text' from x = 228 on."""
    pixels = np.full((195, 610, 3), 255, dtype=np.uint8)
    if photo is not None:
        pixels[15:180, 15:215] = photo
    pixels[40:60, 228:560] = 30  # a line of title
    Image.fromarray(pixels).save(path)
    return str(path)


def test_crop_gives_the_photo_and_a_blank_crop_no_image(efficientnet, tmp_path, caplog):
    photo = np.random.default_rng(1).integers(0, 256, (165, 200, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    paths = [card(tmp_path / "card.png", photo), card(tmp_path / "text.png", None)]
    small = str(tmp_path / "small.png")
    Image.new("RGB", (100, 100), "red").save(small)
    crop = ImageCrop((15, 15, 215, 180))
    with caplog.at_level(logging.WARNING):
        vectors, has_image, blank = efficientnet.encode([*paths, small, None], crop=crop)
    np.testing.assert_array_equal(has_image, [1, 0, 0, 0])
    np.testing.assert_array_equal(blank, [0, 1, 0, 0])
    assert not vectors[1:].any()
    assert "1 image file(s) could not be read" in caplog.text and "small.png" in caplog.text
    expected, *_ = efficientnet.encode([str(tmp_path / "photo.png")])
    np.testing.assert_allclose(vectors[0], expected[0], atol=1e-5)  # the crop is the photo
    whole, has_whole, blank_whole = efficientnet.encode(paths)  # no crop: the card itself
    np.testing.assert_array_equal(has_whole, [1, 1])
    assert not blank_whole.any()
    assert whole[0] @ expected[0] < 0.99


def test_blank_threshold_and_bad_boxes(efficientnet, tmp_path):
    noisy = np.full((165, 200, 3), 250, dtype=np.uint8)
    noisy[::2] = 253  # grey levels with a standard deviation of 1.5
    path = card(tmp_path / "faint.png", noisy)
    _, has_image, blank = efficientnet.encode([path], crop=ImageCrop((15, 15, 215, 180)))
    assert blank.all() and not has_image.any()
    strict = ImageCrop((15, 15, 215, 180), blank_std=1.0)
    _, has_image, blank = efficientnet.encode([path], crop=strict)
    assert has_image.all() and not blank.any()
    for box in [(10, 10, 10, 20), (-1, 0, 5, 5), (0, 9, 5, 5)]:
        with pytest.raises(ValueError, match="left < right"):
            ImageCrop(box)
    with pytest.raises(ValueError, match="blank threshold"):
        ImageCrop((0, 0, 5, 5), blank_std=-1)
