"""Image helpers shared by the file-based sources: decode, square-resize, stack, set channels.

Every helper works on float32 arrays in [0, 1]: one image is (H, W, C), a stack is (N, C, H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from privmed.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Luma weights PIL uses for RGB -> "L" (ITU-R 601-2).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_image(path: Path, channels: int, size: int | None = None) -> np.ndarray:
    """(H, W, channels) float32 in [0, 1] from a PNG/JPEG, center-cropped and resized when `size`.

    8-bit images are cropped and resized by PIL in their own mode (as MedMNIST did); 16-bit
    greyscale keeps its full range (/ 65535) and is resized as float.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                grey = np.clip(np.asarray(im, dtype=np.float32), 0, 65535) / 65535.0
                arr = grey[:, :, None]
                if channels == 3:
                    arr = np.repeat(arr, 3, axis=2)
                return arr if size is None else center_crop_resize(arr, size)
            if im.mode == "F":
                raise DataError(f"{path}: 32-bit float images are not supported; save as 8/16-bit PNG")
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None:
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                if side != size:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({_short(e)})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C): center-crop to a square, then PIL bilinear (antialiased) resize."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(img, dtype=np.float32)
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(img.shape[2])
    ]
    return np.clip(np.stack(planes, axis=2), 0.0, 1.0).astype(np.float32)


def stack_images(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    """(N, C, H, W) float32 from N images (H, W, C) of one size; DataError names two that differ."""
    if not images:
        raise DataError("no images to stack")
    first = images[0].shape[:2]
    for img, name in zip(images, names):
        if img.shape[:2] != first:
            raise DataError(
                f"{name}: image is {img.shape[1]}x{img.shape[0]} but {names[0]} is "
                f"{first[1]}x{first[0]}; images of mixed size: set data.size to resize them all"
            )
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)


def set_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """(N, C, H, W) with C in {1, 3} -> (N, channels, H, W); None keeps C (grey -> RGB repeats)."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3 and c == 1:
        return np.repeat(images, 3, axis=1)
    if channels == 1 and c == 3:
        return np.einsum("nchw,c->nhw", images, _LUMA)[:, None].astype(np.float32)
    raise DataError(f"data.channels: {channels} is not allowed for {c}-channel images; use 1 or 3")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__
