"""Reading dataset images: RGB, fully decoded, with the failure kept instead of raised."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

__all__ = ["open_image"]


def open_image(root: str | Path, relative: str) -> Image.Image:
    """Open ``root/relative`` as a decoded RGB image; raises ``OSError`` naming the file if it is unreadable."""
    path = Path(root) / relative
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(f"cannot read image {path}: {exc}") from exc
