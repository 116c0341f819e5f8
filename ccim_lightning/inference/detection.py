"""Person boxes for images that come without any: OpenCV's HOG people detector and Haar frontal-face cascade.

Both ship their trained weights inside ``opencv-python-headless`` (nothing is downloaded), which is an optional
dependency: ``pip install 'ccim-lightning[detect]'``. OpenCV is imported when a detector is made, never when this
module is imported.

They are classic detectors, fast on a CPU and far weaker than a modern CNN detector: HOG finds upright, whole,
standing people of at least 64x128 pixels and misses sitting, cropped or small ones; the Haar cascade finds frontal
faces of at least ``min_size`` pixels and misses profiles. Where the persons matter, pass your own boxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np

__all__ = [
    "DETECTORS",
    "Box",
    "DetectorName",
    "FaceDetector",
    "BodyDetector",
    "MissingOpenCVError",
    "import_cv2",
    "make_detector",
]

#: (x1, y1, x2, y2) in pixels of the image, x2/y2 exclusive.
Box = tuple[float, float, float, float]
DetectorName = Literal["none", "faces", "bodies"]
#: ``--detector`` choices: ``none`` (the whole image is the person), ``faces`` (CAER-style), ``bodies`` (EMOTIC).
DETECTORS: tuple[DetectorName, ...] = ("none", "faces", "bodies")
INSTALL_HINT = "pip install 'ccim-lightning[detect]'"


class MissingOpenCVError(ImportError):
    """OpenCV, which person detection and video reading need, is not installed."""


def import_cv2(purpose: str) -> ModuleType:
    """Imports OpenCV, or raises :class:`MissingOpenCVError` saying what needs it and how to install it.

    Args:
        purpose: What needs OpenCV, for the message (e.g. "person detection").
    """
    try:
        import cv2
    except ImportError as error:
        raise MissingOpenCVError(f"{purpose} needs OpenCV, which is not installed: {INSTALL_HINT}") from error
    return cv2


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a detector takes an HxWx3 uint8 RGB image, not {image.dtype} of shape {image.shape}")
    return image


def _boxes(rects: np.ndarray | tuple, width: int, height: int) -> list[Box]:
    """OpenCV's (x, y, w, h) rectangles as (x1, y1, x2, y2) boxes clipped to the image, left to right."""
    boxes = []
    for x, y, w, h in np.asarray(rects, dtype=np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x2 > x1 and y2 > y1:
            boxes.append((float(x1), float(y1), float(x2), float(y2)))
    return sorted(boxes)


@dataclass
class FaceDetector:
    """Frontal faces with OpenCV's ``haarcascade_frontalface_default.xml`` (for face-crop models such as CAER-S).

    Args:
        scale_factor: Step between the scanned scales (smaller finds more, slower).
        min_neighbors: Overlapping hits a face needs; higher gives fewer false faces and misses more.
        min_size: Smallest face side in pixels.
    """

    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24

    def __post_init__(self) -> None:
        cv2 = import_cv2("face detection (--detector faces)")
        path = f"{cv2.data.haarcascades}haarcascade_frontalface_default.xml"
        self._cv2, self._cascade = cv2, cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV could not load its face cascade {path}; reinstall it: {INSTALL_HINT}")

    def __call__(self, image: np.ndarray) -> list[Box]:
        """The faces in an HxWx3 uint8 RGB image, as (x1, y1, x2, y2) boxes; an empty list when there are none."""
        gray = self._cv2.cvtColor(_rgb_uint8(image), self._cv2.COLOR_RGB2GRAY)
        rects = self._cascade.detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(self.min_size,) * 2
        )
        return _boxes(rects, image.shape[1], image.shape[0])


@dataclass
class BodyDetector:
    """Whole standing people with OpenCV's HOG + linear SVM people detector (for body-box models such as EMOTIC).

    HOG scans a 64x128 window over an image pyramid; people smaller than that are not found. Overlapping windows
    are merged by non-maximum suppression (OpenCV's own ``dnn.NMSBoxes``).

    Args:
        min_score: Smallest SVM score kept (OpenCV's ``weights``; 0 keeps every window the SVM accepts).
        overlap: Intersection over union above which the lower-scoring of two boxes is dropped.
        scale: Step between pyramid levels.
    """

    min_score: float = 0.5
    overlap: float = 0.45
    scale: float = 1.05

    def __post_init__(self) -> None:
        cv2 = import_cv2("body detection (--detector bodies)")
        self._cv2, self._hog = cv2, cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def __call__(self, image: np.ndarray) -> list[Box]:
        """The people in an HxWx3 uint8 RGB image, as (x1, y1, x2, y2) boxes; an empty list when there are none."""
        height, width = _rgb_uint8(image).shape[:2]
        if height < 128 or width < 64:  # smaller than HOG's window: OpenCV would find nothing anyway
            return []
        rects, scores = self._hog.detectMultiScale(image, winStride=(8, 8), padding=(8, 8), scale=self.scale)
        if len(rects) == 0:
            return []
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        kept = self._cv2.dnn.NMSBoxes([list(map(int, r)) for r in rects], scores.tolist(), self.min_score, self.overlap)
        return _boxes(np.asarray(rects)[np.asarray(kept, dtype=np.int64).reshape(-1)], width, height)


def make_detector(name: DetectorName) -> Callable[[np.ndarray], list[Box]] | None:
    """The detector ``--detector NAME`` asks for: None for ``none``, else a callable image -> boxes.

    Raises:
        ValueError: An unknown name.
        MissingOpenCVError: ``faces``/``bodies`` without OpenCV installed.
    """
    if name == "none":
        return None
    if name == "faces":
        return FaceDetector()
    if name == "bodies":
        return BodyDetector()
    raise ValueError(f"unknown detector {name!r}; one of: {', '.join(DETECTORS)}")
