"""PNG of example images: clean test examples and each corruption at severity 3 and 5."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dreg_jax._files import save_figure  # noqa: E402
from dreg_jax.data.transforms import IMAGE_CORRUPTIONS, corrupt_images  # noqa: E402


def save_examples_png(dataset, path, per_row: int = 8) -> pathlib.Path:
    """Writes a grid: row 1 clean test images with labels, then one row per corruption."""
    info = dataset.info
    if info is None or info.image_shape is None:
        raise ValueError(f"dataset {dataset.name!r} has no image shape to plot")
    shape = info.image_shape
    images = np.asarray(dataset.raw_test[:per_row]).reshape((-1,) + shape)
    rows = [("clean", images)]
    if len(shape) == 2:
        rows += [(f"{c} s5", corrupt_images(images, c, 5, seed=0)) for c in IMAGE_CORRUPTIONS]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(1.2 * per_row, 1.3 * len(rows)), squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(np.clip(imgs[c], 0, 1), cmap=None if len(shape) == 3 else "gray", vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(f"y={dataset.y_test[c]}", fontsize=8)
        axes[r, 0].text(-0.1, 0.5, title, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{dataset.name}: test examples and corruptions (severity 5)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100, bbox_inches="tight")
