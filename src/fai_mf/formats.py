"""Output formats of SPEC §3: `FocoosDet`, `FocoosDetections`, COCO compressed RLE and PNG masks.

Everything here runs on the host (numpy, Pillow); nothing touches torch except to accept tensors.

COCO RLE, as pycocotools writes it (`pycocotools.mask.encode(np.asfortranarray(mask))`): the encoder
(`rle_counts`, `compress_rle_counts`) is `mf_kernels.rle`, the one reference the fused kernels are
checked against (SPEC §4.3), re-exported here; this module adds the decoder and the JSON / mask helpers.

The PNG mask format: standard base64 of an 8-bit grayscale PNG (0 or 255) holding the mask cropped to
its inclusive bbox `[x1, y1, x2, y2]` (rows y1..y2, columns x1..x2, both ends included).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mf_kernels.rle import _delta_encode, as_binary_mask, compress_rle_counts, rle_counts  # noqa: F401 (re-exported)

MASK_FORMATS = ("png", "rle")


# --------------------------------------------------------------------------------------------------
# COCO run-length decoding (the encoder is mf_kernels.rle)
# --------------------------------------------------------------------------------------------------

def counts_to_mask(counts: Sequence[int] | np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Inverse of `rle_counts`: int [N] run lengths and (H, W) -> bool [H, W]."""
    height, width = (int(s) for s in size)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("RLE counts must be a 1-D sequence of non-negative integers")
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected H*W = {height}*{width} = {height * width}")
    values = (np.arange(counts.size) % 2).astype(bool)  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape(width, height).T


def _delta_decode(deltas: np.ndarray) -> np.ndarray:
    """Inverse of `_delta_encode`: counts[i] = deltas[i] + counts[i-2] for i > 2.

    Entries 1, 3, 5, ... and 2, 4, 6, ... are each a running sum (index 0 stands alone)."""
    counts = deltas.copy()
    counts[1::2] = np.cumsum(deltas[1::2])
    counts[2::2] = np.cumsum(deltas[2::2])
    return counts


def decompress_rle_counts(text: str | bytes) -> np.ndarray:
    """Inverse of `compress_rle_counts`: a COCO compressed RLE string -> int64 [N] run lengths."""
    raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (c < 0).any() or (c > 63).any():
        raise ValueError("not a COCO compressed RLE string: characters must lie in '0'..'o'")
    is_last = (c & 0x20) == 0
    if not is_last[-1]:
        raise ValueError("truncated COCO compressed RLE string: the last value is unfinished")
    ends = np.flatnonzero(is_last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    value_id = np.repeat(np.arange(ends.size), ends - starts + 1)
    k = np.arange(c.size) - starts[value_id]  # group index within its value
    x = np.zeros(ends.size, dtype=np.int64)
    np.add.at(x, value_id, np.left_shift(c & 0x1F, 5 * k))
    negative = (c[ends] & 0x10) != 0  # sign bit of the last group: extend it
    n_groups = ends - starts + 1
    x[negative] -= np.left_shift(np.int64(1), 5 * n_groups[negative])
    counts = _delta_decode(x)
    if (counts < 0).any():
        raise ValueError("corrupt COCO compressed RLE string: it decodes to negative run lengths")
    return counts


def encode_rle(mask: Any) -> dict[str, Any]:
    """COCO compressed RLE of a binary mask: `{"size": [H, W], "counts": str}`.

    mask: bool/integer [H, W] numpy array or torch tensor (nonzero = foreground). Equals
    `pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))` with counts decoded to str.
    """
    binary = as_binary_mask(mask)
    return {"size": [int(binary.shape[0]), int(binary.shape[1])], "counts": compress_rle_counts(rle_counts(binary))}


def rle_to_json(size: Sequence[int], counts: str) -> str:
    """`FocoosDet.mask` of a COCO compressed RLE: the JSON string `{"size": [H, W], "counts": str}`."""
    return json.dumps({"size": [int(size[0]), int(size[1])], "counts": counts})


def _parse_rle(rle: Mapping[str, Any] | str) -> tuple[list[int], np.ndarray]:
    """`(size, counts)` of an RLE dict or its JSON string; counts compressed (str/bytes) or a list."""
    if isinstance(rle, str):
        try:
            rle = json.loads(rle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"RLE string is not JSON of {{'size': [H, W], 'counts': ...}}: {exc}") from exc
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be {'size': [H, W], 'counts': str | list[int]}")
    size = [int(s) for s in rle["size"]]
    if len(size) != 2 or min(size) < 0:
        raise ValueError(f"RLE size must be [H, W] with H, W >= 0, got {rle['size']!r}")
    counts = rle["counts"]
    counts = decompress_rle_counts(counts) if isinstance(counts, (str, bytes)) else np.asarray(counts, dtype=np.int64)
    return size, counts


def decode_rle(rle: Mapping[str, Any] | str) -> np.ndarray:
    """bool [H, W] mask of a COCO RLE dict (compressed or list counts) or of its JSON string."""
    size, counts = _parse_rle(rle)
    return counts_to_mask(counts, size)


def rle_area(counts: Sequence[int] | np.ndarray) -> int:
    """Foreground pixel count of run lengths (the sum of the odd-indexed runs)."""
    return int(np.asarray(counts, dtype=np.int64)[1::2].sum())


def rle_bbox(counts: Sequence[int] | np.ndarray, size: Sequence[int]) -> list[int] | None:
    """Inclusive [x1, y1, x2, y2] of the foreground of run lengths over an (H, W) mask; None if empty.

    A run of 1s from flat (column-major) index s to e covers columns s//H..e//H; rows s%H..e%H when
    it stays in one column, every row when it spans several.
    """
    height = int(size[0])
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    lengths, stops = counts[1::2], ends[1::2]
    starts = stops - lengths
    keep = lengths > 0
    if not keep.any():
        return None
    starts, lasts = starts[keep], stops[keep] - 1
    one_column = starts // height == lasts // height
    y1 = np.where(one_column, starts % height, 0).min()
    y2 = np.where(one_column, lasts % height, height - 1).max()
    return [int(starts.min() // height), int(y1), int(lasts.max() // height), int(y2)]


# --------------------------------------------------------------------------------------------------
# PNG masks
# --------------------------------------------------------------------------------------------------

def encode_png(mask: Any) -> str:
    """Standard base64 of an 8-bit grayscale PNG (0 / 255) of a bool/integer [h, w] mask."""
    from PIL import Image

    binary = as_binary_mask(mask)
    if binary.size == 0:
        raise ValueError(f"cannot write an empty ({binary.shape}) mask as PNG")
    buffer = io.BytesIO()
    Image.fromarray(binary.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return png_to_base64(buffer.getvalue())


def png_to_base64(png: bytes) -> str:
    """`FocoosDet.mask` of a PNG file: its standard base64, as ASCII text."""
    return base64.b64encode(png).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """bool [h, w] of a base64 PNG mask (nonzero = foreground)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L")) > 0
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"mask is not a base64 PNG: {exc}") from exc


def crop_to_bbox(mask: np.ndarray, bbox: Sequence[int]) -> np.ndarray:
    """[H, W] mask -> rows y1..y2, columns x1..x2 (inclusive) of bbox [x1, y1, x2, y2]."""
    x1, y1, x2, y2 = (int(v) for v in bbox)
    return mask[y1:y2 + 1, x1:x2 + 1]


def encode_mask(mask: Any, bbox: Sequence[int] | None, mask_format: str = "png") -> str:
    """`FocoosDet.mask` of a full-size bool [H, W] mask: base64 PNG of the inclusive bbox crop ("png")
    or the JSON string of its COCO compressed RLE ("rle")."""
    check_mask_format(mask_format)
    binary = as_binary_mask(mask)
    if mask_format == "rle":
        return rle_to_json(binary.shape, encode_rle(binary)["counts"])
    if bbox is None:
        raise ValueError("a PNG mask needs the bbox it is cropped to")
    return encode_png(crop_to_bbox(binary, bbox))


def check_mask_format(mask_format: str) -> None:
    """ValueError unless mask_format is "png" or "rle"."""
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")


def decode_mask(det: "FocoosDet | Mapping[str, Any]", image_size: Sequence[int] | None = None) -> np.ndarray:
    """bool [H, W] full-size mask of a detection, whichever format its `mask` holds.

    det: a `FocoosDet` or its dict. image_size: (H, W) of the image; needed to place a PNG crop, and
    checked against the size an RLE carries. An RLE mask is recognised by its JSON `{`, which never
    starts a base64 string.
    """
    det = det if isinstance(det, FocoosDet) else FocoosDet.model_validate(det)
    if det.mask is None:
        raise ValueError("this detection has no mask")
    if det.mask.lstrip().startswith("{"):
        mask = decode_rle(det.mask)
        if image_size is not None and list(mask.shape) != [int(s) for s in image_size]:
            raise ValueError(f"RLE mask has size {list(mask.shape)}, but image_size is {list(image_size)}")
        return mask
    if image_size is None or det.bbox is None:
        raise ValueError("a PNG mask is a bbox crop: decode_mask needs det.bbox and image_size=(H, W)")
    height, width = (int(s) for s in image_size)
    x1, y1, x2, y2 = det.bbox
    if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
        raise ValueError(f"bbox {det.bbox} does not fit an image of size (H, W) = ({height}, {width})")
    crop = decode_png(det.mask)
    if crop.shape != (y2 - y1 + 1, x2 - x1 + 1):
        raise ValueError(f"PNG mask is {crop.shape[1]}x{crop.shape[0]} (WxH) but bbox {det.bbox} is "
                         f"{x2 - x1 + 1}x{y2 - y1 + 1}")
    full = np.zeros((height, width), dtype=bool)
    full[y1:y2 + 1, x1:x2 + 1] = crop
    return full


# --------------------------------------------------------------------------------------------------
# Detections (JSON-serialisable, shaped like focoos' pydantic models)
# --------------------------------------------------------------------------------------------------

def _optional(value: Any, kind: type, name: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"FocoosDet.{name} must be {kind.__name__} or None, got {type(value).__name__}")
    return value


@dataclass
class FocoosDet:
    """One detection: bbox [x1, y1, x2, y2] (ints, max inclusive), conf, cls_id, label, mask (str).

    `mask` is a base64 PNG of the bbox crop or the JSON string of a COCO RLE; see `decode_mask`.
    """

    bbox: list[int] | None
    conf: float
    cls_id: int
    label: str | None = None
    mask: str | None = None

    def model_dump(self) -> dict[str, Any]:
        """Plain dict of the five fields (like pydantic's `model_dump`)."""
        return dataclasses.asdict(self)

    @classmethod
    def model_validate(cls, data: Mapping[str, Any]) -> "FocoosDet":
        """Build from a dict, checking types; float bbox values (old focoos results) become ints."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a FocoosDet must be a dict, got {type(data).__name__}")
        bbox = data.get("bbox")
        if bbox is not None:
            if len(bbox) != 4:
                raise ValueError(f"FocoosDet.bbox must be [x1, y1, x2, y2], got {bbox!r}")
            bbox = [int(v) for v in bbox]
        conf, cls_id = data.get("conf"), data.get("cls_id")
        if isinstance(conf, bool) or not isinstance(conf, (int, float)):
            raise ValueError(f"FocoosDet.conf must be a number, got {conf!r}")
        if isinstance(cls_id, bool) or not isinstance(cls_id, int):
            raise ValueError(f"FocoosDet.cls_id must be an int, got {cls_id!r}")
        return cls(bbox=bbox, conf=float(conf), cls_id=cls_id, label=_optional(data.get("label"), str, "label"),
                   mask=_optional(data.get("mask"), str, "mask"))


@dataclass
class FocoosDetections:
    """The detections of one image.

    detections: list of `FocoosDet`, in query order.
    image: the image's path when it was given as a path, else None.
    latency: milliseconds spent on this image, `{"preprocess", "inference", "postprocess"}`; for images
        run together as one batch, "inference" is the batch's model time divided by the batch size.
    """

    detections: list[FocoosDet] = field(default_factory=list)
    image: str | None = None
    latency: dict[str, float] | None = None

    def __len__(self) -> int:
        return len(self.detections)

    def __iter__(self) -> Iterator[FocoosDet]:
        return iter(self.detections)

    def __getitem__(self, index: int) -> FocoosDet:
        return self.detections[index]

    def model_dump(self) -> dict[str, Any]:
        """`{"detections": [dict, ...], "image": ..., "latency": ...}` (like pydantic's `model_dump`)."""
        return {"detections": [d.model_dump() for d in self.detections], "image": self.image,
                "latency": None if self.latency is None else dict(self.latency)}

    def model_dump_json(self, indent: int | None = None) -> str:
        return json.dumps(self.model_dump(), indent=indent)

    to_json = model_dump_json

    @classmethod
    def model_validate(cls, data: Mapping[str, Any]) -> "FocoosDetections":
        """Build from a `model_dump()` dict."""
        if not isinstance(data, Mapping) or not isinstance(data.get("detections"), list):
            raise ValueError("FocoosDetections needs a dict with a 'detections' list")
        latency = data.get("latency")
        if latency is not None and not isinstance(latency, Mapping):
            raise ValueError(f"FocoosDetections.latency must be a dict or None, got {type(latency).__name__}")
        image = data.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"FocoosDetections.image must be a str or None, got {type(image).__name__}")
        return cls(detections=[FocoosDet.model_validate(d) for d in data["detections"]], image=image,
                   latency=None if latency is None else {str(k): float(v) for k, v in latency.items()})

    @classmethod
    def from_json(cls, text: str) -> "FocoosDetections":
        """Inverse of `model_dump_json`."""
        return cls.model_validate(json.loads(text))
