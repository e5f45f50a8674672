"""Cheap image features for the cold start, when there is no model to take embeddings from.

Why these: the first labeled batch should cover the data's looks (scenes, lighting, colour, layout) and they
cost a resize and a histogram, not a network. A 12x12 grey thumbnail carries the layout, an HSV histogram
the colour make-up, and an edge histogram the texture, each normalised so that none dominates.
"""

from __future__ import annotations

import cv2
import numpy as np

FEATURES_VERSION = "cheap-v1"  # part of the score cache key: change it when the features change


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def cheap_features(image_bgr: np.ndarray) -> np.ndarray:
    """A 352-d descriptor of a BGR image: layout (144), colour (128) and texture (80), each of unit norm."""
    small = cv2.resize(image_bgr, (64, 64), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    layout = cv2.resize(grey, (12, 12), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    colour = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256])
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    mag, ang = cv2.cartToPolar(gx, gy)
    texture, _, _ = np.histogram2d(
        ang.ravel(), np.minimum(mag.ravel(), 1020), bins=(8, 10), range=((0, 2 * np.pi), (0, 1020))
    )
    return np.concatenate([_unit(layout), _unit(np.sqrt(colour)), _unit(np.sqrt(texture))])
