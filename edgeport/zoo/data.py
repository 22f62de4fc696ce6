"""The digits data set (bundled inside scikit-learn, so it loads offline) and its one split."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

TEST_SIZE = 360  # 1797 images: 1437 train / 360 test, stratified, seed 0
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test); images float32 (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED)
    for array in (x_train, y_train, x_test, y_test):
        array.setflags(write=False)
    return x_train, y_train, x_test, y_test
