"""Training images to compare generations with: a folder of image files, a Parquet file or an npz.

- folder: every .png/.jpg/.jpeg/.webp/.bmp/.gif in it and below, sorted; the id is the path
  relative to the folder;
- Parquet: one image column of encoded bytes (`image`, `img`, `jpg`, `png` or `bytes`; binary, or a
  struct with a `bytes` field as Hugging Face datasets write it) and an optional id column
  (`image_id`, `id`, `key`, `name` or `path`; else the row number);
- npz: `images` (N, 3, H, W) or (N, H, W, 3), uint8 or floats in [0, 1] (the demo's
  `train_images.npz`), and optional `image_ids`.

Images are read in batches, centre-cropped to a square and resized to the generations' side, so
a large set is embedded in bounded memory; `get(i)` reads one back (the contact sheet's match).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memscan.errors import InputError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "bytes")
ID_COLUMNS = ("image_id", "id", "key", "name", "path")


def _to_square(image: Any, side: int) -> np.ndarray:
    """A PIL image as (3, side, side) float32 in [0, 1]: RGB, centre-cropped, resized."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    edge = min(w, h)
    left, top = (w - edge) // 2, (h - edge) // 2
    image = image.crop((left, top, left + edge, top + edge))
    if edge != side:
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _decode(data: bytes, where: str, side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _to_square(image, side)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"--train-images: cannot read image {where}: {one_line(exc)}") from None


class TrainImages:
    """The training images at `path`, read lazily at `side` x `side`."""

    def __init__(self, path: str | Path, side: int) -> None:
        self.path = Path(path)
        self.side = side
        if not self.path.exists():
            raise InputError(f"--train-images {path}: no such file or folder")
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            self.ids = [str(p.relative_to(self.path)) for p in self.files]
        elif self.path.name.lower().endswith(".npz"):
            self.kind = "npz"
            self._array, self.ids = _read_npz(self.path)
        elif self.path.name.lower().endswith(".parquet"):
            self.kind = "parquet"
            self._column, self.ids, self._table = _read_parquet(self.path)
        else:
            raise InputError(f"--train-images {path}: give a folder of images, a .parquet or an .npz file")
        if not self.ids:
            raise InputError(f"--train-images {path}: no images found")

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, index: int) -> np.ndarray:
        """Image `index` as (3, side, side) float32 in [0, 1]."""
        if self.kind == "folder":
            return _decode(self.files[index].read_bytes(), str(self.files[index]), self.side)
        if self.kind == "npz":
            return _resize_array(self._array[index : index + 1], self.side)[0]
        value = self._table.column(self._column)[index].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise InputError(f"--train-images {self.path}: row {index} holds no image bytes")
        return _decode(data, f"{self.path} row {index}", self.side)

    def batches(self, size: int = 64) -> Iterator[np.ndarray]:
        """(n, 3, side, side) float32 batches in id order."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            if self.kind == "npz":
                yield _resize_array(self._array[start:stop], self.side)
            else:
                yield np.stack([self.get(i) for i in range(start, stop)])


def _read_npz(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())
            key = "images" if "images" in names else next((n for n in names if data[n].ndim == 4), None)
            if key is None:
                raise InputError(f"--train-images {path}: no 'images' array (N, 3, H, W) or (N, H, W, 3)")
            images = np.asarray(data[key])
            ids = [str(i) for i in data["image_ids"]] if "image_ids" in names else [str(i) for i in range(len(images))]
    except (OSError, ValueError) as exc:
        raise InputError(f"--train-images {path}: cannot read: {one_line(exc)}") from None
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise InputError(f"--train-images {path}: images must be (N, 3, H, W) or (N, H, W, 3), got {images.shape}")
    if images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)
    if len(ids) != len(images):
        raise InputError(f"--train-images {path}: {len(ids)} image_ids for {len(images)} images")
    return images, ids


def _resize_array(images: np.ndarray, side: int) -> np.ndarray:
    """(n, 3, H, W) uint8 or [0, 1] floats as float32 [0, 1], centre-cropped and resized to `side`."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    h, w = x.shape[-2:]
    edge = min(h, w)
    x = x[..., (h - edge) // 2 : (h - edge) // 2 + edge, (w - edge) // 2 : (w - edge) // 2 + edge]
    if edge != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1).numpy()


def _read_parquet(path: Path) -> tuple[str, list[str], Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"--train-images {path}: cannot read: {one_line(exc)}") from None
    names = {n.lower(): n for n in table.column_names}
    column = next((names[c] for c in IMAGE_COLUMNS if c in names), None)
    if column is None:
        raise InputError(f"--train-images {path}: no image column ({', '.join(IMAGE_COLUMNS)}) of encoded image bytes")
    kind = table.schema.field(column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise InputError(f"--train-images {path}: column {column!r} is {kind}, not encoded image bytes")
    id_column = next((names[c] for c in ID_COLUMNS if c in names and names[c] != column), None)
    ids = ([str(v) for v in table.column(id_column).to_pylist()] if id_column
           else [str(i) for i in range(table.num_rows)])
    return column, ids, table
