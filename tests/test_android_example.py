"""The Android example (examples/android) cannot be built here: check that every Python function
its Kotlin activity calls exists in ``edge_client.android`` and takes that many arguments."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from edge_client import android
from edge_client.vision.frame import FORMATS

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "android"
ACTIVITY = EXAMPLE / "app" / "src" / "main" / "java" / "org" / "enfpire" / "example" / "MainActivity.kt"


def call_attrs(source: str) -> list[tuple[str, int]]:
    """(function name, number of arguments after it) of every ``callAttr("name", ...)``."""
    calls = []
    for match in re.finditer(r'callAttr\(\s*"(\w+)"', source):
        depth, args, i, quote = 1, 0, match.end(), ""
        while depth:
            ch = source[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch == "," and depth == 1:
                args += 1
            i += 1
        calls.append((match.group(1), args))
    return calls


def test_the_parser_counts_top_level_arguments() -> None:
    assert call_attrs('m.callAttr("f", a(b, c), "x,y", listOf(1, 2)).toString(); m.callAttr("g")') \
        == [("f", 3), ("g", 0)]


def test_every_python_call_of_the_activity_exists_with_its_arity() -> None:
    source = ACTIVITY.read_text(encoding="utf-8")
    assert 'getModule("edge_client.android")' in source
    calls = call_attrs(source)
    assert {name for name, _ in calls} >= {"recognize_jpeg", "recognize_frame", "recognize_feature", "clear_cache",
                                           "close_all"}
    for name, count in calls:
        function = getattr(android, name, None)
        assert callable(function) and not name.startswith("_"), f"edge_client.android has no {name}"
        inspect.signature(function).bind(*range(count))  # TypeError when the arity is wrong


def test_the_camera_frame_call_names_a_known_pixel_format() -> None:
    source = ACTIVITY.read_text(encoding="utf-8")
    call = re.search(r'callAttr\(\s*"recognize_frame",([^)]*)\)', source)
    assert call is not None
    arguments = [a.strip() for a in call.group(1).split(",")]
    assert list(inspect.signature(android.recognize_frame).parameters)[3] == "pixel_format"
    assert arguments[3].strip('"') in FORMATS and "OUTPUT_IMAGE_FORMAT_RGBA_8888" in source
    assert arguments[6] == "plane.rowStride" and arguments[7] == "image.imageInfo.rotationDegrees"


def test_the_build_asks_for_chaquopys_python_and_numpy_1() -> None:
    gradle = (EXAMPLE / "app" / "build.gradle").read_text(encoding="utf-8")
    assert 'id "com.chaquo.python"' in gradle and 'version "3.10"' in gradle
    requirements = (EXAMPLE / "app" / "requirements.txt").read_text(encoding="utf-8").split()
    assert "numpy==1.26.*" in requirements
    assert not {"flask", "scikit-learn", "waitress"} & {r.lower() for r in requirements}
