"""The records of the synthetic world: news, users and impressions, as arrays (one row each).
The click model makes them; the vocabulary, the images and the writer read them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class News:
    sub: np.ndarray  # (N,) subcategory
    tier: np.ndarray  # (N,) quality tier -1, 0, +1
    style: np.ndarray  # (N,) -1 no image, 0 stripes, 1 smooth
    published: np.ndarray  # (N,) unix seconds
    archive: np.ndarray  # (N,) published before the candidate window of the first impression
    buzz: np.ndarray  # (N,) hidden appeal, standard normal


@dataclass(frozen=True)
class Users:
    interests: np.ndarray  # (U, 3) subcategories, -1 padded
    likes: np.ndarray  # (U, S) bool
    likes_category: np.ndarray  # (U, C) bool
    style: np.ndarray  # (U,) preferred style, -1 none


@dataclass(frozen=True)
class Impressions:
    user: np.ndarray  # (I,)
    time: np.ndarray  # (I,) unix seconds; train rows first, then dev rows
    n_train: int
    offsets: np.ndarray  # (I+1,) CSR into items
    items: np.ndarray  # (M,) news rows
    labels: np.ndarray  # (M,) bool
    utility: np.ndarray  # (M,) z
