"""Camera frames under Chaquopy's Python 3.10 and numpy 1.x: every layout turns into the pixels
a file of the same picture gives, and ``android.recognize_frame`` answers in JSON (a typed error
here, where no interpreter exists; the main suite runs it against the real model)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from edge_client import android
from edge_client.vision.frame import Frame, squash

from .conftest import DATASET

SIZE = (640, 480)
INPUT = (224, 224)


def scene() -> np.ndarray:
    photo = sorted((DATASET / "images").glob("*/*.jpg"))[0]
    return np.asarray(Image.open(photo).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC))


def test_packed_and_yuv_frames_give_pillows_pixels() -> None:
    rgb = scene()
    expected = np.asarray(squash(Image.fromarray(rgb), INPUT))  # what a file of these pixels becomes
    one_step = np.asarray(Image.fromarray(rgb).resize(INPUT, Image.Resampling.BILINEAR))
    assert np.abs(expected.astype(int) - one_step).mean() < 2  # the box pre-shrink changes little
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    for frame in (Frame(rgb.tobytes(), *SIZE), Frame(rgba.tobytes(), *SIZE, "rgba"),
                  Frame(np.ascontiguousarray(rgb[..., ::-1]), *SIZE, "bgr")):
        assert np.array_equal(frame.to_rgb(INPUT), expected), frame.pixel_format
    # YUV: the JFIF conversion Pillow itself uses, chroma at half resolution; within rounding
    y, cb, cr = (np.asarray(p) for p in Image.fromarray(rgb).convert("YCbCr").split())
    cb, cr = (np.asarray(Image.fromarray(c).reduce(2)) for c in (cb, cr))
    nv21 = Frame(y.tobytes() + np.stack([cr, cb], -1).tobytes(), *SIZE, "nv21").to_rgb(INPUT)
    i420 = Frame(y.tobytes() + cb.tobytes() + cr.tobytes(), *SIZE, "i420").to_rgb(INPUT)
    assert np.array_equal(nv21, i420)
    assert np.abs(nv21.astype(int) - expected).mean() < 3
    turned = Frame(np.ascontiguousarray(np.rot90(rgb)), SIZE[1], SIZE[0], rotation=90).to_rgb(INPUT)
    assert np.abs(turned.astype(int) - expected).max() <= 2  # only the two resize passes' rounding


def test_recognize_frame_answers_json_without_an_interpreter(live_server) -> None:  # type: ignore[no-untyped-def]
    settings = json.dumps({"dummies": 0, "cache": False})
    try:
        short = json.loads(android.recognize_frame(b"\0" * 99, *SIZE, "nv21", live_server.url, settings))
        assert short["ok"] is False and short["error"]["type"] == "PhotoError"
        frame = scene().tobytes()
        answer = json.loads(android.recognize_frame(frame, *SIZE, "rgb", live_server.url, settings, 0, 90))
        assert answer["ok"] is False and answer["error"]["type"] == "InterpreterNotFoundError"
    finally:
        assert json.loads(android.close_all()) == {"ok": True}
