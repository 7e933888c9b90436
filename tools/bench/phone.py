"""Phone-side figures: extraction of photos, 12-megapixel JPEGs and camera frames against the bare ``invoke()``."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_client.vision import interpreter as tfl
from edge_client.vision.extractor import Extractor
from edge_client.vision.frame import Frame
from tools.bench.plan import Plan
from tools.bench.timing import interleaved, median_ms
from tools.dataset import Dataset


def twelve_megapixel(photo: Path) -> bytes:
    """A real photo upscaled to 4000x3000 and saved as a JPEG, like a phone's."""
    big = Image.open(photo).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def camera_frames(photo: Path) -> dict[str, Any]:
    """The photo as a 640x480 camera hands it over: CameraX RGBA_8888 (the headline), NV21, a thumbnail JPEG."""
    scene = Image.open(photo).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
    rgb = np.asarray(scene)
    y, cb, cr = (np.asarray(p) for p in scene.convert("YCbCr").split())
    vu = np.stack([np.asarray(Image.fromarray(c).reduce(2)) for c in (cr, cb)], -1)
    thumbnail = io.BytesIO()
    scene.save(thumbnail, "JPEG", quality=90)
    return {"frame": Frame(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]).tobytes(), 640, 480, "rgba"),
            "frame_nv21": Frame(y.tobytes() + vu.tobytes(), 640, 480, "nv21"), "thumbnail": thumbnail.getvalue()}


def bench_extraction(plan: Plan, extractor: Extractor, dataset: Dataset) -> dict[str, Any]:
    """Extraction against bare ``invoke()`` of a second interpreter of the same model."""
    photo = dataset.photos[0][1]
    jpeg = twelve_megapixel(photo)
    bare, _ = tfl.make_interpreter(str(extractor.model_path), extractor.num_threads)
    details = bare.get_input_details()[0]
    bare.set_tensor(details["index"], tfl.quantize_input(extractor.preprocess(photo), details, 128.0, 128.0))
    frames = camera_frames(photo)
    times = interleaved({"bare": bare.invoke, "224": lambda: extractor.extract(photo),
                         "12mp": lambda: extractor.extract(jpeg),
                         **{name: (lambda f=f: extractor.extract(f)) for name, f in frames.items()}}, plan.repeats * 2)
    cosines = [float(extractor.extract(big) @ extractor.extract(big, fast=False)) for big in
               (twelve_megapixel(p) for _, p in dataset.photos[::max(1, len(dataset.photos) // plan.photos_12mp)]
                [:plan.photos_12mp])]
    out = {"extract_threads": extractor.num_threads, "extract_bare_ms": median_ms(times["bare"]),
           "extract_224_ms": median_ms(times["224"]), "extract_12mp_ms": median_ms(times["12mp"]),
           "extract_12mp_jpeg_bytes": len(jpeg),
           "extract_cosine_fast_vs_careful_min": round(min(cosines), 5),
           "extract_cosine_fast_vs_careful_median": round(float(np.median(cosines)), 5),
           "extract_cosine_photos": len(cosines)}
    out["extract_ratio_224"] = round(out["extract_224_ms"] / out["extract_bare_ms"], 3)
    out["extract_ratio_12mp"] = round(out["extract_12mp_ms"] / out["extract_bare_ms"], 3)
    for name in frames:  # 640x480: a camera frame (RGBA, NV21) or a thumbnail JPEG
        out[f"extract_{name}_ms"] = median_ms(times[name])
    out["extract_ratio_camera_frame"] = round(out["extract_frame_ms"] / out["extract_bare_ms"], 3)
    return {**out, **bench_extract_many(plan, extractor, dataset)}


def bench_extract_many(plan: Plan, extractor: Extractor, dataset: Dataset) -> dict[str, Any]:
    """Index-build throughput: decode-ahead ``extract_many`` against one photo after another."""
    photos = [p for _, p in dataset.photos[:10 * plan.repeats]]
    start = time.perf_counter()
    for p in photos:
        extractor.extract(p)
    sequential = len(photos) / (time.perf_counter() - start)
    start = time.perf_counter()
    list(extractor.extract_many(photos))
    overlapped = len(photos) / (time.perf_counter() - start)
    return {"extract_sequential_photos_per_s": round(sequential, 1),
            "extract_many_photos_per_s": round(overlapped, 1)}
