"""OpenCV person detectors: nothing on images without a person, the drawn face/figure found, OpenCV optional."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("cv2", reason="the detect extra (opencv-python-headless) is not installed")

from ccim_lightning.inference import detection  # noqa: E402
from ccim_lightning.inference.detection import BodyDetector, FaceDetector, MissingOpenCVError, make_detector  # noqa: E402


def drawn_face(width=320, height=240):
    """A flat-shaded frontal face (skin oval, hair, two eyes, nose, mouth); returns the image and the oval's box."""
    image = Image.new("RGB", (width, height), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    oval = (110, 50, 210, 180)
    draw.ellipse(oval, fill=(225, 185, 160))
    draw.rectangle((110, 50, 210, 80), fill=(60, 40, 20))
    draw.ellipse((135, 95, 155, 108), fill=(30, 30, 30))
    draw.ellipse((165, 95, 185, 108), fill=(30, 30, 30))
    draw.polygon([(160, 110), (152, 140), (168, 140)], fill=(190, 140, 120))
    draw.rectangle((140, 152, 180, 160), fill=(120, 40, 40))
    return np.asarray(image), oval


def drawn_figure(height=200):
    """A standing silhouette ``height`` pixels tall (head, torso, arms, legs) on a plain background.

    Returns the image and the figure's box (x1, y1, x2, y2).
    """
    unit = height / 8
    width = int(height * 0.55)
    image = Image.new("RGB", (width * 3, int(height * 1.4)), (150, 160, 150))
    draw = ImageDraw.Draw(image)
    cx, top = width * 1.5, height * 0.2
    draw.ellipse((cx - 0.45 * unit, top, cx + 0.45 * unit, top + unit), fill=(200, 160, 140))
    shoulders = [(cx - 1.1 * unit, top + 1.3 * unit), (cx + 1.1 * unit, top + 1.3 * unit)]
    torso = [(cx - 0.4 * unit, top + unit), (cx + 0.4 * unit, top + unit), shoulders[1]]
    torso += [(cx + 1.0 * unit, top + 4 * unit), (cx - 1.0 * unit, top + 4 * unit), shoulders[0]]
    draw.polygon(torso, fill=(20, 20, 60))
    for side in (-1, 1):
        arm = [
            shoulders[(side + 1) // 2],
            (cx + side * 1.4 * unit, top + 4 * unit),
            (cx + side * 1.1 * unit, top + 4 * unit),
        ]
        draw.polygon(arm, fill=(20, 20, 60))
        leg = [(cx + side * 1.0 * unit, top + 4 * unit), (cx + side * 0.1 * unit, top + 4 * unit)]
        leg += [(cx + side * 0.3 * unit, top + 8 * unit), (cx + side * 0.9 * unit, top + 8 * unit)]
        draw.polygon(leg, fill=(40, 30, 20))
    return np.asarray(image), (cx - 1.4 * unit, top, cx + 1.4 * unit, top + 8 * unit)


def iou(a, b):
    """Intersection over union of two (x1, y1, x2, y2) boxes, written out."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def contains(box, inner):
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


@pytest.fixture(scope="module")
def faces():
    return FaceDetector()


@pytest.fixture(scope="module")
def bodies():
    return BodyDetector()


def nothing_to_find():
    rng = np.random.default_rng(0)
    flat = np.full((240, 320, 3), 120, dtype=np.uint8)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 320, 3)).copy()
    return {"flat": flat, "noise": noise, "gradient": gradient}


@pytest.mark.parametrize("name", ["flat", "noise", "gradient"])
def test_no_person_no_box(faces, bodies, name):
    image = nothing_to_find()[name]
    assert faces(image) == []
    assert bodies(image) == []


def test_the_face_detector_finds_the_drawn_face_and_not_the_drawn_figure(faces):
    image, oval = drawn_face()
    (box,) = faces(image)
    assert all(isinstance(v, float) for v in box)
    assert iou(box, oval) > 0.5
    assert faces(drawn_figure()[0]) == []  # the figure's head is a plain oval: no eyes, no face


def test_the_body_detector_finds_the_drawn_standing_figure(bodies):
    image, figure = drawn_figure(height=200)
    (box,) = bodies(image)
    assert contains(box, (figure[0] + 5, figure[1] + 5, figure[2] - 5, figure[3] - 5))  # HOG's window is loose
    assert iou(box, figure) > 0.3
    assert 0 <= box[0] < box[2] <= image.shape[1] and 0 <= box[1] < box[3] <= image.shape[0]


def test_the_body_detector_finds_nothing_below_its_window_and_figures_too_small(bodies):
    assert bodies(np.full((127, 300, 3), 90, dtype=np.uint8)) == []  # lower than HOG's 128-pixel window
    assert bodies(drawn_figure(height=96)[0]) == []  # a person below the window's size is not found


def test_detectors_take_rgb_uint8_only(faces, bodies):
    for detector in (faces, bodies):
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            detector(np.zeros((200, 200, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            detector(np.zeros((200, 200), dtype=np.uint8))


def test_make_detector_names():
    assert make_detector("none") is None
    assert isinstance(make_detector("faces"), FaceDetector)
    assert isinstance(make_detector("bodies"), BodyDetector)
    with pytest.raises(ValueError, match="unknown detector 'people'"):
        make_detector("people")


def test_without_opencv_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(MissingOpenCVError, match=r"pip install 'ccim-lightning\[detect\]'"):
        detection.FaceDetector()
    with pytest.raises(MissingOpenCVError, match="body detection"):
        make_detector("bodies")
    assert make_detector("none") is None  # no detector, no OpenCV needed


def test_importing_the_package_and_the_command_does_not_import_opencv():
    code = (
        "import sys; import ccim_lightning, ccim_lightning.inference.detection, ccim_lightning.inference.video, "
        "ccim_lightning.commands.predict_files; print('cv2' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
