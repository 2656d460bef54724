"""Annotated images with Pillow: masks blended in class colours, boxes, and "label score" tags."""
from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

from .formats import FocoosDetections, decode_mask


def class_color(cls_id: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour per class id (golden-ratio hue steps)."""
    hue = (cls_id * 0.6180339887) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_uint8_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] of one image in any form `fai_mf.inputs.load_images` accepts."""
    from .inputs import load_images

    loaded = load_images(image)
    if len(loaded) != 1:
        raise ValueError(f"annotate draws one image at a time, got {len(loaded)}")
    return loaded[0].tensor.round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()


def annotate(image: Any, detections: FocoosDetections, alpha: float = 0.5, draw_boxes: bool = True):
    """A PIL RGB image of `image` with each detection's mask blended in its class colour (weight
    alpha), its bbox outlined, and a "label score" tag (the class id when there is no label)."""
    from PIL import Image, ImageDraw

    canvas = _as_uint8_rgb(image).astype(np.float32)
    height, width = canvas.shape[:2]
    for det in detections:
        if det.mask is not None:
            mask = decode_mask(det, (height, width))
            canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(class_color(det.cls_id), np.float32)
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(out)
    for det in detections:
        if det.bbox is None:
            continue
        color = class_color(det.cls_id)
        x1, y1, x2, y2 = det.bbox
        if draw_boxes:
            draw.rectangle([x1, y1, x2, y2], outline=color, width=1)
        text = f"{det.label if det.label is not None else det.cls_id} {det.conf:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = max(0, y1 - (bottom - top) - 2)
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=color)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return out
