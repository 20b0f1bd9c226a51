"""Image decoding: any PIL mode to ``uint8 [H, W, 3]`` RGB, with EXIF orientation and size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DatasetError

__all__ = ["BadImage", "read_dataset_image", "read_rgb_image"]

_EXIF_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> ``uint8 [H, W, 3]`` RGB."""
    if img.mode == "RGB":
        return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> RGB conversion clips at 255 instead of rescaling 0..65535.
        grey = np.asarray(img).astype(np.float32) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("P", "PA") and "transparency" in img.info:
        # Going through RGBA avoids PIL's warning about palette transparency; alpha is then dropped.
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read any image file as ``uint8 [H, W, 3]`` RGB with its EXIF orientation applied (for inference).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb_array(ImageOps.exif_transpose(img))
    except _DECODE_ERRORS as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


class BadImage(Exception):
    """An image listed in an annotation file could not be read; the dataset raises or skips it."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing

    def to_user_error(self, path: Path, ann_file: Path) -> Exception:
        hint = "fix or remove the file, or set on_bad_image='skip' to skip unreadable images"
        if self.missing:
            return FileNotFoundError(f"image file not found: {path} (listed in {ann_file}); {hint}")
        return DatasetError(f"cannot read image {path} (listed in {ann_file}): {self.reason}; {hint}")


def read_dataset_image(path: Path, ann_file: Path, width: int, height: int) -> np.ndarray:
    """Read an image of a dataset as ``uint8 [H, W, 3]`` RGB, checking it has the size its JSON entry says.

    The EXIF orientation is applied when that gives the JSON size; when the stored pixels already have
    it, the annotation tool ignored EXIF and the pixels are kept as stored.

    Raises:
        BadImage: the file is missing or cannot be decoded.
        DatasetError: the size matches the JSON neither as stored nor after the EXIF orientation.
    """
    if not path.is_file():
        raise BadImage("file not found", missing=True)
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            return _to_rgb_array(_as_annotated(img, path, ann_file, (width, height)))
    except DatasetError:
        raise
    except _DECODE_ERRORS as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e


def _as_annotated(img: Image.Image, path: Path, ann_file: Path, expected: tuple[int, int]) -> Image.Image:
    orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    raw_size = img.size
    if orientation not in range(2, 9):
        if raw_size != expected:
            raise DatasetError(
                f"image {path} (in {ann_file}) is {raw_size[0]}x{raw_size[1]} (w x h) but the JSON "
                f"says {expected[0]}x{expected[1]}; fix the image entry's width/height"
            )
        return img
    transposed = ImageOps.exif_transpose(img)
    if transposed.size == expected:
        return transposed
    if raw_size != expected:
        raise DatasetError(
            f"image {path} (in {ann_file}) is {raw_size[0]}x{raw_size[1]} (w x h) as stored "
            f"and {transposed.size[0]}x{transposed.size[1]} after its EXIF orientation "
            f"{orientation}, but the JSON says {expected[0]}x{expected[1]}; fix the image "
            "entry's width/height"
        )
    return img
