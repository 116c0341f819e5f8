"""Every N-th frame of a video file, read with OpenCV's ``VideoCapture`` (the ``detect`` extra)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccim_lightning.inference.detection import import_cv2

__all__ = ["VIDEO_SUFFIXES", "VideoFrames", "is_video"]

#: File suffixes read as videos (lower case); OpenCV's FFmpeg backend decodes them.
VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def is_video(path: str | Path) -> bool:
    """Whether ``path`` is a file with a video suffix (:data:`VIDEO_SUFFIXES`, any case)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoFrames:
    """Frames 0, stride, 2*stride, ... of a video as HxWx3 uint8 RGB arrays with their frame numbers.

    Frames are decoded in order; the skipped ones are only grabbed (demuxed, not converted), which is how
    ``VideoCapture`` skips reliably for every codec (seeking by frame number is exact only for some).

    Args:
        path: The video file.
        stride: Keep every ``stride``-th frame, starting with frame 0.

    Raises:
        FileNotFoundError: No such file.
        ValueError: ``stride`` below 1, or a file OpenCV cannot open as a video.
    """

    path: Path
    stride: int = 1

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.stride < 1:
            raise ValueError(f"--stride must be 1 or more (every N-th frame), not {self.stride}")
        if not self.path.is_file():
            raise FileNotFoundError(f"video {self.path} does not exist")
        self.frames_read = 0
        """Frames decoded or grabbed by the last complete iteration (the video's true length once it ends)."""
        capture = self._open()
        # The container's count: an estimate for some formats, so only the progress bar uses it.
        self.reported_frames = max(int(capture.get(self._cv2.CAP_PROP_FRAME_COUNT)), 0)
        capture.release()

    def _open(self):
        self._cv2 = import_cv2("reading a video")
        capture = self._cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise ValueError(f"OpenCV cannot open {self.path} as a video (unknown container or codec, or damaged)")
        return capture

    def expected_count(self) -> int:
        """How many frames the iteration should give, from the container's frame count (0 when it has none)."""
        return -(-self.reported_frames // self.stride)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None]]:
        """Yields ``(frame_number, rgb_frame)`` for frames 0, stride, 2*stride, ...; None for a frame that fails."""
        capture = self._open()
        number = 0
        try:
            while capture.grab():
                if number % self.stride == 0:
                    ok, frame = capture.retrieve()
                    # a frame that does not decode is reported to the caller, who counts it as a skip
                    yield number, self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB) if ok else None
                number += 1
        finally:
            capture.release()
        self.frames_read = number
