"""encode_store: vectors aligned with the store, has_image, manifest, cache, resume, CLI."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_encode_encoders import card, save_tiny_bert, save_tiny_clip, save_tiny_dinov2
from typer.testing import CliRunner

from mmnewsrec.cli import app
from mmnewsrec.data.store import build_store
from mmnewsrec.encode.pipeline import EncodeConfig, EncodeError, encode_store, news_texts
from mmnewsrec.formats.vectors import NewsVectors, VectorsError

NEWS = [  # id, category, subcategory, title, abstract, image
    ("N1", "sports", "football", "Chiefs win in overtime", "A late field goal.", None),
    ("N2", "sports", "football", "Chiefs win in overtime", "A late field goal.", None),
    ("N3", "finance", "markets", "Stocks fall as rates rise", "", "N3.jpg"),
    ("N4", "finance", "markets", "Bond yields climb", "Treasuries sell off.", "N4.png"),
    ("N5", "health", "medicine", "Vaccine trial results", "Phase three.", "N5.jpg"),  # corrupt
    ("N6", "sports", "golf", "Golfer leads after first round", "", None),
]


def write_mind(folder: Path, news=NEWS, images: bool = True) -> Path:
    """A one-split MIND folder (train/news.tsv, train/behaviors.tsv, images/)."""
    (folder / "train").mkdir(parents=True)
    rows = [f"{i}\t{c}\t{s}\t{t}\t{a}\thttps://x/{i}\t[]\t[]" for i, c, s, t, a, _ in news]
    (folder / "train/news.tsv").write_text("\n".join(rows) + "\n")
    (folder / "train/behaviors.tsv").write_text("1\tU1\t11/15/2019 8:55:22 AM\tN1 N3\tN4-1 N6-0\n")
    if images:
        (folder / "images").mkdir()
        rng = np.random.default_rng(0)
        for name in ("N3.jpg", "N4.png"):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / name)
        (folder / "images/N5.jpg").write_bytes(b"\xff\xd8\xff broken")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(write_mind(root / "mind"), root / "store")
    return root / "store"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    return {
        "text_encoder": str(save_tiny_bert(root / "bert")),
        "image_encoder": str(save_tiny_dinov2(root / "dinov2")),
    }


def refuse_models(monkeypatch, sides=("text", "image", "joint")) -> None:
    """From now on, loading a model of these sides fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    loaders = {
        "text": "mmnewsrec.encode.text.SentenceEncoder",
        "image": "mmnewsrec.encode.image.load_image_encoder",
        "joint": "mmnewsrec.encode.joint.load_joint_encoder",
    }
    for side in sides:
        monkeypatch.setattr(loaders[side], refuse)


def test_default_encoders_align_vectors_with_the_store(store, tmp_path, caplog):
    from mmnewsrec.formats.store import Store

    with caplog.at_level(logging.WARNING):
        nv = encode_store(store, tmp_path / "emb", EncodeConfig(device="cpu"))
    assert nv.vectors.shape == (7, 384 + 1280) and nv.vectors.dtype == np.float16
    assert not nv.vectors[0].any()
    np.testing.assert_array_equal(nv.has_image, [0, 0, 0, 1, 1, 0, 0])  # N5's file is corrupt
    assert not nv.vectors[~nv.has_image, 384:].any()
    np.testing.assert_array_equal(nv.vectors[1], nv.vectors[2])  # same text, no image
    assert "N5.jpg" in caplog.text
    texts = news_texts(Store.load(store).news, ("category", "subcategory", "title"))
    assert texts[0] == "sports. football. Chiefs win in overtime"
    text_part = np.asarray(nv.vectors[1:, :384], dtype=np.float32)
    cosine = text_part @ text_part.T
    np.fill_diagonal(cosine, -1)
    assert cosine.argmax(axis=1)[[2, 3]].tolist() == [3, 2]  # N3, N4: the finance news
    manifest = json.loads((tmp_path / "emb/manifest.json").read_text())
    assert manifest["text"]["encoder"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(manifest["text"]["encoder"]["sha256"]) == 64
    assert manifest["image"]["encoder"]["id"] == "efficientnet-lite0"
    assert manifest["image"]["unreadable"] == [str(store.parent / "mind/images/N5.jpg")]
    assert manifest["fusion"]["method"] == "concat" and manifest["precision"] == "fp32"
    assert manifest["store"]["content_hash"] == Store.load(store).content_hash
    assert manifest["num_with_image"] == 2 and manifest["timings"]["total_s"] > 0
    loaded = NewsVectors.load(tmp_path / "emb")
    np.testing.assert_array_equal(loaded.vectors, nv.vectors)
    assert loaded.hash == manifest["hash"] and loaded.dim == 1664 and loaded.num_news == 6


def test_unchanged_inputs_do_no_model_work(store, tiny, tmp_path, monkeypatch, caplog):
    out = tmp_path / "emb"
    first = encode_store(store, out, EncodeConfig(**tiny))
    stamp = (out / "vectors.npy").stat().st_mtime_ns
    refuse_models(monkeypatch)
    with caplog.at_level(logging.INFO):
        again = encode_store(store, out, EncodeConfig(**tiny))
    assert "vectors up to date" in caplog.text
    assert again.hash == first.hash
    assert (out / "vectors.npy").stat().st_mtime_ns == stamp


def test_new_fusion_and_new_fields_recompute_only_what_changed(store, tiny, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    concat = encode_store(store, out, EncodeConfig(**tiny))
    assert concat.dim == 64
    refuse_models(monkeypatch)
    hadamard = encode_store(store, out, EncodeConfig(**tiny, fusion="hadamard"))
    assert hadamard.dim == 32 and hadamard.hash != concat.hash
    assert hadamard.manifest["text"]["cached"] and hadamard.manifest["image"]["cached"]
    monkeypatch.undo()
    refuse_models(monkeypatch, ["image"])
    fields = encode_store(store, out, EncodeConfig(**tiny, text_fields=("title", "abstract")))
    assert not fields.manifest["text"]["cached"] and fields.manifest["image"]["cached"]
    np.testing.assert_array_equal(fields.vectors[:, 32:], concat.vectors[:, 32:])
    assert not np.array_equal(fields.vectors[:, :32], concat.vectors[:, :32])
    assert len(list((out / "parts").glob("*.json"))) == 2  # parts no longer used are removed


def test_vector_folders_sharing_a_parts_folder_encode_the_text_once(
    store, tiny, tmp_path, monkeypatch
):
    parts = tmp_path / "parts"
    both = encode_store(store, tmp_path / "both", EncodeConfig(**tiny), parts_dir=parts)
    refuse_models(monkeypatch, ["text"])
    text = {**tiny, "image_encoder": "none"}
    text_only = encode_store(store, tmp_path / "text", EncodeConfig(**text), parts_dir=parts)
    assert text_only.manifest["text"]["cached"] and text_only.dim == 32
    np.testing.assert_array_equal(text_only.vectors, both.vectors[:, :32])
    assert len(list(parts.glob("*.json"))) == 2  # a shared folder keeps the image part
    assert not any((tmp_path / "both/parts").iterdir())


def test_forced_reencoding_redoes_everything_and_is_deterministic(store, tiny, tmp_path):
    first = encode_store(store, tmp_path / "emb", EncodeConfig(**tiny))
    data = (tmp_path / "emb/vectors.npy").read_bytes()
    # Same models, inputs, batches and threads: the same kernels on the same shapes, so bit-equal.
    second = encode_store(store, tmp_path / "emb", EncodeConfig(**tiny), force=True)
    assert not second.manifest["text"]["cached"] and not second.manifest["image"]["cached"]
    assert first.hash == second.hash
    assert (tmp_path / "emb/vectors.npy").read_bytes() == data


def test_changed_store_is_a_cache_miss(tmp_path, tiny):
    news = [row if row[0] != "N6" else (*row[:3], "Golfer withdraws", *row[4:]) for row in NEWS]
    build_store(write_mind(tmp_path / "a", NEWS), tmp_path / "store_a")
    build_store(write_mind(tmp_path / "b", news), tmp_path / "store_b")
    a = encode_store(tmp_path / "store_a", tmp_path / "emb", EncodeConfig(**tiny))
    b = encode_store(tmp_path / "store_b", tmp_path / "emb", EncodeConfig(**tiny))
    assert a.hash != b.hash
    # The unchanged news are embedded again in batches padded to other lengths, so their float32
    # vectors may differ in the last bits and round to the neighbouring float16 (2**-11 below 1).
    np.testing.assert_allclose(a.vectors[:6], b.vectors[:6], rtol=0, atol=2**-11)
    assert not np.array_equal(a.vectors[6], b.vectors[6])


def test_interrupted_run_leaves_no_vectors_and_resumes(store, tiny, tmp_path, monkeypatch):
    from mmnewsrec.encode.image import HFVisionEncoder

    out = tmp_path / "emb"

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(HFVisionEncoder, "encode", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            encode_store(store, out, EncodeConfig(**tiny))
    assert not (out / "manifest.json").exists()
    with pytest.raises(VectorsError, match="no complete news vectors"):
        NewsVectors.load(out)
    refuse_models(monkeypatch, ["text"])  # the text part was kept
    nv = encode_store(store, out, EncodeConfig(**tiny))
    assert nv.manifest["text"]["cached"] and not nv.manifest["image"]["cached"]


def test_joint_clip_encoder(store, tmp_path):
    torch.manual_seed(0)
    clip = str(save_tiny_clip(tmp_path / "clip"))
    concat = encode_store(store, tmp_path / "a", EncodeConfig(joint_encoder=clip))
    assert concat.dim == 48 and concat.manifest["text"]["encoder"]["joint"]
    hadamard = encode_store(store, tmp_path / "b", EncodeConfig(joint_encoder=clip, fusion="mean"))
    assert hadamard.dim == 24
    projection = hadamard.manifest["fusion"]["projection"]
    assert not projection["text"] and not projection["image"]  # aligned spaces left as they are
    np.testing.assert_array_equal(hadamard.has_image, concat.has_image)


def test_store_without_images_encodes_text_only(tmp_path, tiny):
    build_store(write_mind(tmp_path / "mind", images=False), tmp_path / "store")
    nv = encode_store(tmp_path / "store", tmp_path / "emb", EncodeConfig(tiny["text_encoder"]))
    assert nv.dim == 32 and not nv.has_image.any()
    assert nv.manifest["fusion"]["method"] == "text" and nv.manifest["image"] is None


def test_output_folder_of_something_else_is_refused(store, tmp_path, tiny):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VectorsError, match="does not hold news vectors"):
        encode_store(store, tmp_path, EncodeConfig(**tiny))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_news_vectors_from_arrays(tmp_path):
    vectors = np.zeros((4, 3), dtype=np.float16)
    vectors[1:] = 0.5
    has_image = np.array([False, True, False, True])
    NewsVectors(vectors, has_image, {"fusion": {"method": "concat"}}).save(tmp_path / "emb")
    loaded = NewsVectors.load(tmp_path / "emb")
    np.testing.assert_array_equal(loaded.vectors, vectors)
    np.testing.assert_array_equal(loaded.has_image, has_image)
    assert loaded.num_news == 3 and loaded.dim == 3 and "3 news x 3 (concat)" in loaded.summary()
    with pytest.raises(ValueError, match="row 0 is padding"):
        NewsVectors(np.ones((2, 3)), np.zeros(2, dtype=bool))
    with pytest.raises(ValueError, match="has_image must be bool"):
        NewsVectors(vectors, np.zeros(3, dtype=bool))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"text_fields": ("title", "body")}, "text fields"),
        ({"joint_encoder": "clip", "text_encoder": "bert"}, "joint encoder gives the text"),
        ({"image_encoder": "facebook/dinov2-small", "image_size": 256}, "image size applies"),
        ({"fusion": "max"}, "fusion must be one of"),
        ({"device": "gpu"}, "device must be"),
        ({"precision": "int8"}, "precision must be"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(EncodeError, match=message):
        EncodeConfig(**options)


def test_fusion_needing_a_missing_side_fails_before_model_work(store, tmp_path, monkeypatch):
    refuse_models(monkeypatch)
    config = EncodeConfig(text_encoder="none", image_encoder="none")
    with pytest.raises(EncodeError, match="nothing to encode"):
        encode_store(store, tmp_path / "emb", config)
    with pytest.raises(EncodeError, match="needs an image encoder"):
        encode_store(store, tmp_path / "emb", EncodeConfig(image_encoder="none", fusion="mean"))


def test_cli_encode(store, tiny, tmp_path):
    args = ["encode", str(store), "--out", str(tmp_path / "emb")]
    args += ["--text-encoder", tiny["text_encoder"], "--image-encoder", tiny["image_encoder"]]
    result = CliRunner().invoke(app, [*args, "--fusion", "mean", "--text-fields", "title"])
    assert result.exit_code == 0, result.output
    assert "6 news x 32 (mean), 2 with an image" in result.output
    assert NewsVectors.load(tmp_path / "emb").manifest["text"]["fields"] == ["title"]
    result = CliRunner().invoke(app, [*args, "--fusion", "sum"])
    assert result.exit_code == 2 and "fusion must be one of" in result.output


def test_same_category_news_are_closer_with_minilm(tmp_path):
    """Semantic sanity on the synthetic data set: titles of one category are more alike."""
    from mmnewsrec.data.synthetic import SynthConfig, generate
    from mmnewsrec.formats.store import Store

    generate(tmp_path / "synth", SynthConfig.quick(0))
    build_store(tmp_path / "synth", tmp_path / "store")
    config = EncodeConfig(text_fields=("title",), image_encoder="none")
    nv = encode_store(tmp_path / "store", tmp_path / "emb", config)
    vectors = np.asarray(nv.vectors[1:], dtype=np.float32)
    category = Store.load(tmp_path / "store").news["category"].to_numpy()
    cosine = vectors @ vectors.T  # (N, N)
    same = category[:, None] == category[None, :]
    off_diagonal = ~np.eye(len(vectors), dtype=bool)
    within, across = cosine[same & off_diagonal].mean(), cosine[~same].mean()
    assert within > across + 0.1 and within > 2 * across, (within, across)  # 0.24 vs 0.08


def test_public_api_is_sorted_and_imports_no_model_library():
    import subprocess
    import sys

    import mmnewsrec.encode as encode

    assert encode.__all__ == sorted(encode.__all__)
    assert all(hasattr(encode, name) for name in encode.__all__)
    code = "import sys, mmnewsrec.encode; print({'torch', 'transformers'} & set(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "set()", result.stderr


def test_image_crop_is_in_the_key_and_counts_blank_cards(tmp_path, tiny, monkeypatch):
    mind = write_mind(tmp_path / "mind")
    photo = np.random.default_rng(2).integers(0, 256, (165, 200, 3), dtype=np.uint8)
    card(mind / "images/N3.jpg", photo)
    card(mind / "images/N4.png", None)  # a text-only card
    build_store(mind, tmp_path / "store")
    out = tmp_path / "emb"
    whole = encode_store(tmp_path / "store", out, EncodeConfig(**tiny))
    np.testing.assert_array_equal(whole.has_image, [0, 0, 0, 1, 1, 0, 0])
    refuse_models(monkeypatch, ["text"])
    cropped = encode_store(
        tmp_path / "store", out, EncodeConfig(**tiny, image_crop=(15, 15, 215, 180))
    )
    np.testing.assert_array_equal(cropped.has_image, [0, 0, 0, 1, 0, 0, 0])
    assert not cropped.vectors[4, 32:].any()
    image = cropped.manifest["image"]
    assert image["crop"] == {"box": [15, 15, 215, 180], "blank_std": 2.0}
    assert image["blank_crops"] == 1 and not image["cached"]
    assert image["unreadable"] == [str(mind / "images/N5.jpg")]
    assert cropped.hash != whole.hash and image["key"] != whole.manifest["image"]["key"]
    assert "2 with an image" not in cropped.summary() and "1 blank" in cropped.summary()
    args = ["encode", str(tmp_path / "store"), "--out", str(out)]
    args += ["--text-encoder", tiny["text_encoder"], "--image-encoder", tiny["image_encoder"]]
    result = CliRunner().invoke(app, [*args, "--image-crop", "15,15,215,180"])
    assert result.exit_code == 0, result.output
    assert "1 with an image (cropped [15, 15, 215, 180]; 1 blank)" in result.output
    bad = CliRunner().invoke(app, [*args, "--image-crop", "15,15,215"])
    assert bad.exit_code != 0 and "LEFT,TOP,RIGHT,BOTTOM" in bad.output
    bad = CliRunner().invoke(app, [*args, "--image-crop", "215,15,15,180"])
    assert bad.exit_code != 0 and "image crop: need 0 <= left < right" in bad.output
