"""Fusion of text and image parts: widths, projections, what a missing image does."""

import numpy as np
import pytest

from mmnewsrec.encode.fusion import Fusion, normalize, projection


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    return normalize(np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


@pytest.fixture
def parts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    has_image = np.array([True, False, True, False, True])
    image = unit_rows(5, 12, 1) * has_image[:, None]  # the image part of a missing image is zero
    return unit_rows(5, 8, 0), image, has_image


@pytest.mark.parametrize(("d_in", "d_out"), [(12, 8), (8, 12), (8, 8)])
def test_projection_is_orthogonal_and_fixed_by_seed(d_in, d_out):
    p = projection(d_in, d_out, seed=3)
    assert p.shape == (d_in, d_out)
    gram = p.T @ p if d_in >= d_out else p @ p.T
    np.testing.assert_allclose(gram, np.eye(min(d_in, d_out)), atol=1e-5)
    np.testing.assert_array_equal(p, projection(d_in, d_out, seed=3))
    assert not np.allclose(p, projection(d_in, d_out, seed=4))


@pytest.mark.parametrize(
    ("method", "dim"), [("concat", 20), ("hadamard", 8), ("mean", 8), ("text", 8), ("image", 12)]
)
def test_output_width(parts, method, dim):
    text, image, has_image = parts
    fusion = Fusion(method, text_dim=8, image_dim=12)
    out = fusion(text, image, has_image)
    assert out.shape == (5, dim) == (5, fusion.out_dim)
    assert out.dtype == np.float32
    assert fusion.describe()["dim"] == dim


def test_concat_keeps_both_parts_and_zeros_for_a_missing_image(parts):
    text, image, has_image = parts
    image_with_junk = image + (~has_image)[:, None]  # a stray value must not leak through
    out = Fusion("concat", 8, 12)(text, image_with_junk, has_image)
    np.testing.assert_array_equal(out[:, :8], text)
    np.testing.assert_array_equal(out[has_image, 8:], image[has_image])
    assert not out[~has_image, 8:].any()


def test_hadamard_and_mean_fall_back_to_the_projected_text_without_an_image(parts):
    text, image, has_image = parts
    for method in ("hadamard", "mean"):
        fusion = Fusion(method, 8, 12)
        out = fusion(text, image, has_image)
        np.testing.assert_allclose(out[~has_image], fusion.project(text)[~has_image], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    hadamard = Fusion("hadamard", 8, 12)
    t, i = hadamard.project(text), hadamard.project(image)
    expected = normalize(t * i)
    np.testing.assert_allclose(hadamard(text, image, has_image)[has_image], expected[has_image])


def test_mean_and_hadamard_combine_the_projections_computed_here(parts):
    """Rows with an image against the parts projected in the test: the 8-wide text is the common
    width (unit rows, kept); the 12-wide image goes through the seed-0 projection to 8."""
    text, image, has_image = parts

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    t, i = unit(text[has_image]), unit(image[has_image] @ projection(12, 8, seed=0))
    mean = Fusion("mean", 8, 12)(text, image, has_image)
    np.testing.assert_allclose(mean[has_image], unit(t + i), atol=1e-6)
    hadamard = Fusion("hadamard", 8, 12)(text, image, has_image)
    np.testing.assert_allclose(hadamard[has_image], unit(t * i), atol=1e-6)
    assert np.abs(mean[has_image] - t).max() > 0.1  # the image moves the vector


def test_only_the_wider_side_is_projected(parts):
    text, image, _ = parts
    fusion = Fusion("mean", 8, 12)
    np.testing.assert_allclose(fusion.project(text), text, atol=1e-6)  # already 8 wide
    assert fusion.project(image).shape == (5, 8)
    projection_entry = fusion.describe()["projection"]
    assert projection_entry["text"] is False and projection_entry["image"] is True


def test_equal_widths_keep_aligned_spaces_aligned():
    """A joint encoder's text and image vectors live in one space; fusion must not rotate one."""
    text = unit_rows(4, 6, 0)
    same = text.copy()
    out = Fusion("hadamard", 6, 6)(text, same, np.ones(4, dtype=bool))
    np.testing.assert_allclose(out, normalize(text * text), atol=1e-6)
    wide = Fusion("mean", 6, 6, dim=10)  # both sides projected: by the same matrix
    np.testing.assert_allclose(wide.project(text) @ wide.project(same).T, text @ same.T, atol=1e-5)


def test_fusion_dim_and_seed(parts):
    text, image, has_image = parts
    a = Fusion("mean", 8, 12, dim=4, seed=0)(text, image, has_image)
    b = Fusion("mean", 8, 12, dim=4, seed=1)(text, image, has_image)
    assert a.shape == (5, 4)
    assert not np.allclose(a, b)


def test_image_fusion_and_text_fusion(parts):
    text, image, has_image = parts
    np.testing.assert_array_equal(Fusion("text", 8, 12)(text, None, has_image), text)
    out = Fusion("image", 0, 12)(None, image, has_image)
    np.testing.assert_array_equal(out, image)
    assert not out[~has_image].any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "sum", "text_dim": 8, "image_dim": 12}, "fusion must be one of"),
        ({"method": "concat", "text_dim": 8, "image_dim": 0}, "needs an image encoder"),
        ({"method": "hadamard", "text_dim": 0, "image_dim": 12}, "needs a text encoder"),
        ({"method": "concat", "text_dim": 8, "image_dim": 12, "dim": 4}, "hadamard and mean"),
    ],
)
def test_invalid_fusions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Fusion(**kwargs)


@pytest.mark.parametrize("method", ["concat", "hadamard", "mean", "text", "image"])
def test_a_fusion_is_read_back_from_its_manifest_entry(method):
    fusion = Fusion(method, 0 if method == "image" else 6, 0 if method == "text" else 4, seed=3)
    read = Fusion.from_manifest(fusion.describe(), "m.json")
    assert read.describe() == fusion.describe()
    rng = np.random.default_rng(0)
    text, image, has_image = rng.normal(size=(5, 6)), rng.normal(size=(5, 4)), np.arange(5) < 3
    np.testing.assert_array_equal(read(text, image, has_image), fusion(text, image, has_image))
    with pytest.raises(ValueError, match="m.json.*text_dim"):
        Fusion.from_manifest({"method": "concat", "image_dim": 4}, "m.json")
    with pytest.raises(ValueError, match="m.json.*fusion must be one of"):
        Fusion.from_manifest({"method": "sum", "text_dim": 6}, "m.json")
