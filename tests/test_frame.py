"""Camera frames (edge_client.vision.frame) on real photos and the real model: every layout of the same
pixels gives the file path's feature, YUV and rotation within the model's own rounding noise."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_client import android
from edge_client.errors import PhotoError
from edge_client.vision.extractor import Extractor
from edge_client.vision.frame import Frame
from tests.conftest import dataset_photos
from tools.live import LiveServer

SIZE = (640, 480)  # CameraX ImageAnalysis's default resolution
#: A one-level change of a few pixels moves this uint8 model's feature by about 0.005 (measured:
#: +-1 noise on every pixel gives 0.995); YUV 4:2:0 and turning rounds pixels at least that much.
ROUNDING = 0.99


def scene(photo: Path) -> np.ndarray:
    """A real photo as a 640x480 camera would see it, HxWx3 RGB."""
    return np.asarray(Image.open(photo).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC))


def yuv420(rgb: np.ndarray, layout: str) -> bytes:
    """The same pixels as full-range YUV 4:2:0 (JFIF), chroma averaged over 2x2 blocks."""
    y, cb, cr = (np.asarray(p) for p in Image.fromarray(rgb).convert("YCbCr").split())
    cb, cr = (np.asarray(Image.fromarray(c).reduce(2)) for c in (cb, cr))
    chroma = {"nv21": np.stack([cr, cb], -1), "nv12": np.stack([cb, cr], -1), "i420": np.stack([cb, cr])}[layout]
    return y.tobytes() + chroma.tobytes()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    return [scene(photo) for photo in dataset_photos(spots=3, per_spot=1)]


def test_packed_layouts_give_the_file_paths_pixels(extractor: Extractor, scenes: list[np.ndarray],
                                                   tmp_path: Path) -> None:
    for i, rgb in enumerate(scenes):
        png = tmp_path / f"scene{i}.png"  # lossless: the file holds exactly the frame's pixels
        Image.fromarray(rgb).save(png)
        expected = extractor.preprocess(png)
        padded = np.zeros((SIZE[1], SIZE[0] * 4 + 64), np.uint8)  # a row stride past the pixels
        padded[:, : SIZE[0] * 4] = np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]).reshape(SIZE[1], -1)
        frames = {
            "rgb": Frame(rgb.tobytes(), *SIZE, "rgb"),
            "array": rgb,
            "bgr": Frame(np.ascontiguousarray(rgb[..., ::-1]), *SIZE, "bgr"),
            # Android's buffer ends right after the last row's pixels, short of a whole stride
            "rgba strided": Frame(padded.tobytes()[:-64], *SIZE, "rgba", row_stride=SIZE[0] * 4 + 64),
            "bgrx": Frame(np.dstack([rgb[..., ::-1], rgb[..., :1]]).tobytes(), *SIZE, "bgrx"),
        }
        for name, frame in frames.items():
            assert np.array_equal(extractor.preprocess(frame), expected), name
        assert cosine(extractor.extract(frames["rgba strided"]), extractor.extract(png)) == pytest.approx(1.0, abs=1e-6)


def test_yuv_frames_agree_with_the_rgb_pixels(extractor: Extractor, scenes: list[np.ndarray]) -> None:
    for rgb in scenes:
        expected = extractor.extract(rgb)
        features = {layout: extractor.extract(Frame(yuv420(rgb, layout), *SIZE, layout)) for layout in
                    ("nv21", "nv12", "i420")}
        assert np.array_equal(features["nv21"], features["nv12"]) and np.array_equal(features["nv21"], features["i420"])
        assert cosine(features["nv21"], expected) >= ROUNDING
        # swapped chroma is a different picture: the check above can fail
        swapped = Frame(yuv420(rgb, "nv12"), *SIZE, "nv21")
        assert cosine(extractor.extract(swapped), expected) < cosine(features["nv21"], expected)


def test_a_strided_yuv_frame_reads_only_its_pixels(extractor: Extractor, scenes: list[np.ndarray]) -> None:
    rgb, stride = scenes[0], SIZE[0] + 32
    plain = yuv420(rgb, "nv21")
    rows = np.frombuffer(plain, np.uint8).reshape(-1, SIZE[0])
    strided = np.full((rows.shape[0], stride), 255, np.uint8)
    strided[:, : SIZE[0]] = rows
    frame = Frame(strided.tobytes()[:-32], *SIZE, "nv21", row_stride=stride)
    assert np.array_equal(extractor.preprocess(frame), extractor.preprocess(Frame(plain, *SIZE, "nv21")))


def test_rotation_turns_the_sensors_frame_upright(extractor: Extractor, scenes: list[np.ndarray]) -> None:
    for rgb in scenes:
        upright = extractor.extract(rgb)
        for rotation in (90, 180, 270):
            # what the sensor delivers: the scene turned counter-clockwise by the rotation CameraX reports
            sensor = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
            height, width = sensor.shape[:2]
            right = cosine(extractor.extract(Frame(sensor, width, height, "rgb", rotation=rotation)), upright)
            wrong = cosine(extractor.extract(Frame(sensor, width, height, "rgb", rotation=(rotation + 180) % 360)),
                           upright)
            assert right >= ROUNDING and right > wrong, (rotation, right, wrong)


def test_a_frame_and_the_12mp_jpeg_of_one_scene_agree(extractor: Extractor) -> None:
    """The capture path's point: a preview frame stands in for the full photo, as closely as the
    12 MP JPEG's own fast path stands in for its careful decode (0.98, tests/test_extractor.py)."""
    for photo in dataset_photos(spots=3, per_spot=1):
        full = Image.open(photo).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
        jpeg = io.BytesIO()
        full.save(jpeg, "JPEG", quality=92)
        frame = np.asarray(full.resize(SIZE, Image.Resampling.BILINEAR, reducing_gap=3.0))
        assert cosine(extractor.extract(frame), extractor.extract(jpeg.getvalue())) > 0.98


@pytest.mark.parametrize("bad, words", [
    (dict(data=b"\0" * (640 * 480 * 3 - 1)), "needs at least"),
    (dict(pixel_format="yuyv"), "unknown frame format"),
    (dict(rotation=45), "rotation"),
    (dict(width=0), "no pixels"),
    (dict(row_stride=100), "shorter than a row"),
    (dict(data=b"\0" * (641 * 480 * 3 // 2), width=641, pixel_format="nv21"), "even width"),
    (dict(data=b"\0" * (641 * 720), pixel_format="i420", row_stride=641), "odd"),
])
def test_a_malformed_frame_is_a_photo_error_when_made(bad: dict[str, object], words: str) -> None:
    fields = {"data": b"\0" * (640 * 480 * 3), "width": 640, "height": 480, "pixel_format": "rgb", **bad}
    with pytest.raises(PhotoError, match=words):
        Frame(**fields)  # type: ignore[arg-type]


def test_android_recognize_frame_answers_like_the_photo(live_server: LiveServer,
                                                        held_out: list[tuple[str, Path]]) -> None:
    settings = json.dumps({"dummies": 0, "seed": 3, "cache": False})
    try:
        for _, photo in held_out[:4]:
            rgb = scene(photo)
            rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]).tobytes()
            png = io.BytesIO()
            Image.fromarray(rgb).save(png, "PNG")
            by_frame = json.loads(android.recognize_frame(rgba, *SIZE, "RGBA", live_server.url, settings, 0, 0))
            by_photo = json.loads(android.recognize_jpeg(png.getvalue(), live_server.url, settings))
            assert by_frame["ok"] and by_photo["ok"], (by_frame, by_photo)
            assert by_frame["candidates"][0] == by_photo["candidates"][0]
            assert by_frame["score"] == pytest.approx(by_photo["score"], abs=1e-6)
        bad = json.loads(android.recognize_frame(b"\0" * 100, *SIZE, "rgba", live_server.url, settings))
        assert bad["ok"] is False and bad["error"]["type"] == "PhotoError" and "needs at least" in bad["error"]["message"]
        typo = json.loads(android.recognize_frame(rgba, "wide", 480, "rgba", live_server.url, settings))
        assert typo["ok"] is False and typo["error"]["type"] == "ValueError"
    finally:
        android.close_all()


def test_cli_extracts_several_photos_one_json_line_each(held_out: list[tuple[str, Path]], extractor: Extractor) -> None:
    photos = [str(photo) for _, photo in held_out[:3]]
    done = subprocess.run([sys.executable, "-m", "edge_client.cli", "extract", "--json", *photos],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["photo"] for line in lines] == photos
    for line, photo in zip(lines, photos):
        assert cosine(np.asarray(line["feature"], np.float32), extractor.extract(photo)) == pytest.approx(1.0, abs=1e-5)
