"""Image folders the data and profiling tests build (tests/ is on sys.path: conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def mixed_folder(root: Path, per_class: int = 10, classes=("ant", "bee", "cat")) -> Path:
    """``per_class`` PNGs per class under ``root/<class>``, each of its own size (17..60 pixels a
    side), tinted by class so a model can tell them apart."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(17, 61)), int(rng.integers(17, 61))
            img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
            img[..., c] += 120
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root
