"""The synthetic news images: the topic as hue and shape, the visual style as background.

Two layouts: "plain" writes images/<news_id>.jpg for the news with an image; "im-mind" writes
what IM-MIND distributes: for every news a 610 x 195 card images/<index>.jpg (the photo in
PHOTO_BOX, or a blank box for news without one, then the title in dark text on white) and
projector.csv mapping each news id to its shuffled index.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmnewsrec.data.synthetic.records import News
from mmnewsrec.data.synthetic.vocabulary import all_topics

IMAGE_LAYOUTS = ("plain", "im-mind")
CARD_SIZE = (610, 195)  # width, height of an IM-MIND card
PHOTO_BOX = (15, 15, 215, 180)  # left, top, right, bottom of the card's cover photo
TEXT_LEFT = 228  # where the card's title and source start


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """(n,) hue, saturation, value in [0, 1] -> (n, 3) RGB in [0, 1]."""
    h, s, v = np.broadcast_arrays(np.asarray(h) % 1.0, s, v)
    sector = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    channels = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    return np.stack([np.choose(sector, c) for c in channels], axis=-1)


def _image_params(rng: np.random.Generator, sub: np.ndarray, style: np.ndarray) -> dict:
    """Per-image drawing parameters: topic colours and shape, style, and random layout."""
    topics, n = all_topics(), len(sub)
    rank = topics.rank_in_category[sub]
    hue = topics.category_of[sub] / len(topics.categories) + 0.025 * (rank - 1.5)
    hue = hue + rng.uniform(-0.015, 0.015, n)
    value = rng.uniform(0.8, 1.0, n)
    return {
        "light": _hsv_to_rgb(hue, 0.3, value),
        "dark": _hsv_to_rgb(hue, 0.75, 0.55 * value),
        "ink": _hsv_to_rgb(hue, 1.0, 0.3),
        "shape": rank,
        "style": style,
        "period": rng.uniform(0.06, 0.12, n),  # stripe period, share of the image side
        "angle": rng.uniform(0, np.pi, n),
        "phase": rng.uniform(0, 2 * np.pi, n),
        "cx": rng.uniform(0.35, 0.65, n),
        "cy": rng.uniform(0.35, 0.65, n),
        "radius": rng.uniform(0.2, 0.32, n),
    }


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside of a circle, square, triangle or diamond of radius r around (0, 0)."""
    if shape == 0:
        return dx**2 + dy**2 < r**2
    if shape == 1:
        return np.maximum(abs(dx), abs(dy)) < 0.8 * r
    if shape == 2:
        return (dy < 0.7 * r) & (abs(dx) < 0.6 * (dy + r))
    return abs(dx) + abs(dy) < r


def _render(params: dict, size: int) -> np.ndarray:
    """Draw images (B, size, size, 3) uint8: a background (stripes or smooth) and one shape."""
    col = {k: v.astype(np.float32).reshape(len(v), -1, 1, 1) for k, v in params.items()}
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    along = (x - 0.5) * np.cos(col["angle"]) + (y - 0.5) * np.sin(col["angle"])  # (B, 1, P, P)
    stripes = np.sin(2 * np.pi * along / col["period"] + col["phase"]) > 0
    mix = np.where(col["style"] == 0, stripes, np.clip(0.5 + 0.7 * along, 0, 1))
    light, dark = col["light"], col["dark"]  # (B, 3, 1, 1)
    image = light + mix * (dark - light)  # (B, 3, P, P)
    for shape in range(4):
        b = np.flatnonzero(params["shape"] == shape)
        c = {k: col[k][b] for k in ("cx", "cy", "radius")}
        inside = _shape_mask(shape, x - c["cx"], y - c["cy"], c["radius"])
        image[b] = np.where(inside, col["ink"][b], image[b])
    return np.ascontiguousarray((image * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1))


def _photos(
    rng: np.random.Generator, news: News, size: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(news rows, (B, size, size, 3) pixels) of the news with an image, chunk by chunk."""
    rows = np.flatnonzero(news.style >= 0)
    params = _image_params(rng, news.sub[rows], news.style[rows])
    with tqdm(total=len(rows), desc="images", unit="img", disable=None) as bar:
        for a in range(0, len(rows), chunk):
            yield (
                rows[a : a + chunk],
                _render({k: v[a : a + chunk] for k, v in params.items()}, size),
            )
            bar.update(len(rows[a : a + chunk]))


def write_images(
    folder: Path, rng: np.random.Generator, news: News, size: int, chunk: int = 128
) -> int:
    """Write images/<news_id>.jpg for the news with an image; return how many."""
    folder.mkdir()
    count = 0
    for rows, batch in _photos(rng, news, size, chunk):
        for row, pixels in zip(rows, batch, strict=True):
            Image.fromarray(pixels).save(folder / f"N{row + 1}.jpg", "JPEG", quality=90)
        count += len(rows)
    return count


def card(photo: np.ndarray | None, title: str) -> Image.Image:
    """An IM-MIND card: the photo resized into PHOTO_BOX (blank white if None), the title and
    the source in dark text on white from TEXT_LEFT on."""
    image = Image.new("RGB", CARD_SIZE, "white")
    if photo is not None:
        left, top, right, bottom = PHOTO_BOX
        resized = Image.fromarray(photo).resize(
            (right - left, bottom - top), Image.Resampling.BILINEAR
        )
        image.paste(resized, (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((TEXT_LEFT, 30), title, fill=(20, 20, 20))
    draw.text((TEXT_LEFT, 150), "mmnewsrec synthetic news", fill=(90, 90, 90))
    return image


def write_cards(
    folder: Path,
    map_path: Path,
    rng: np.random.Generator,
    news: News,
    titles: list[str],
    size: int,
    chunk: int = 128,
) -> int:
    """Write an IM-MIND card images/<index>.jpg for every news and `map_path` (nid,
    IM-MIND-INDEX, indices shuffled); return how many cards have a photo."""
    folder.mkdir()
    photos = list(_photos(rng, news, size, chunk))  # drawn first: the same photos as "plain"
    index = rng.permutation(len(titles))
    written = np.zeros(len(titles), dtype=bool)
    for rows, batch in photos:
        for row, pixels in zip(rows, batch, strict=True):
            card(pixels, titles[row]).save(folder / f"{index[row]}.jpg", "JPEG", quality=90)
        written[rows] = True
    for row in np.flatnonzero(~written):
        card(None, titles[row]).save(folder / f"{index[row]}.jpg", "JPEG", quality=90)
    ids = [f"N{row + 1}" for row in range(len(titles))]
    pl.DataFrame({"nid": ids, "IM-MIND-INDEX": index}).write_csv(map_path)
    return int(written.sum())
