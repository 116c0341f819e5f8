"""``ccim predict-files``: a folder of images or a video in, one CSV row per person out, skips counted."""

import logging
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ccim_lightning.commands.cli import build_cli
from ccim_lightning.commands.main import SUBCOMMANDS
from ccim_lightning.commands.main import main as ccim_main
from ccim_lightning.commands.predict_files import (
    PredictFilesError,
    default_output_path,
    list_images,
    predict_files,
    read_boxes_table,
)
from ccim_lightning.datamodules.synthetic import EMOTIONS
from ccim_lightning.inference.detection import MissingOpenCVError
from ccim_lightning.inference.predictor import Predictor

from ..callbacks.test_prediction_writer import SYNTHETIC, TINY, callbacks_arg

cv2 = pytest.importorskip("cv2", reason="the detect extra (opencv-python-headless) is not installed")

CLASSES = list(EMOTIONS[:4])
KEY_AND_BOX = ["person", "x1", "y1", "x2", "y2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CCIM model fitted for one batch on synthetic data: ``<run>/lightning_logs/version_0/.../last.ckpt``."""
    root = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    build_cli([
        "fit", "--config", SYNTHETIC, *TINY, *callbacks_arg(root / "unused.csv"), "--model.init_args.num_prototypes=4",
        "--model.init_args.backbone.init_args.feature_dim=16", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.logger=true", f"--trainer.default_root_dir={root}",
    ])  # fmt: skip
    (path,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, device="cpu")


def write_photo(path, seed, size=(48, 40)):
    """A random-colour image (different content per seed), saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def probabilities(frame):
    return frame[CLASSES].to_numpy(dtype=np.float64)


# --- a folder of images --------------------------------------------------------------------------------------------
def test_folder_with_boxes_csv_gives_one_row_per_person_equal_to_the_predictor(tmp_path, checkpoint, predictor):
    folder = tmp_path / "photos"
    a, b = write_photo(folder / "a.png", 1), write_photo(folder / "b.JPG", 2)
    write_photo(folder / "sub" / "c.png", 3)  # a sub-folder is not read without --recursive
    (folder / "notes.txt").write_text("not an image")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "file,x1,y1,x2,y2\nb.JPG,0,0,20,30\na.png,4,5,30,35\na.png,10,2,60,39\n"
    )  # the last box reaches outside

    out, report = predict_files(checkpoint, folder, boxes=boxes, progress=False, batch_size=2, predictor=predictor)

    assert out == checkpoint.parents[1] / "predictions" / "photos.csv"  # the run folder of the checkpoint
    frame = pd.read_csv(out)
    assert list(frame.columns)[:6] == ["file", *KEY_AND_BOX]
    assert frame["file"].tolist() == ["a.png", "a.png", "b.JPG"]  # sorted files, persons in the table's order
    assert frame[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [
        [4, 5, 30, 35],
        [10, 2, 48, 39],
        [0, 0, 20, 30],
    ]  # clipped
    expected = predictor.predict([rgb(a), rgb(b)], [[(4, 5, 30, 35), (10, 2, 60, 39)], [(0, 0, 20, 30)]])
    np.testing.assert_allclose(probabilities(frame), probabilities(expected), rtol=0, atol=1e-6)
    np.testing.assert_allclose(probabilities(frame).sum(axis=1), 1.0, atol=1e-5)
    assert frame["prediction"].tolist() == [CLASSES[i] for i in probabilities(frame).argmax(axis=1)]
    assert (report.read, report.persons, report.images_with_persons) == (2, 3, 2)


def test_without_boxes_each_image_is_one_person_and_recursive_reads_sub_folders(tmp_path, checkpoint, predictor):
    folder = tmp_path / "photos"
    paths = [write_photo(folder / "a.png", 1), write_photo(folder / "sub" / "c.png", 3, size=(30, 20))]
    out, _ = predict_files(
        checkpoint, folder, recursive=True, out=tmp_path / "p.csv", progress=False, predictor=predictor
    )
    frame = pd.read_csv(out)
    assert frame["file"].tolist() == ["a.png", "sub/c.png"]
    assert frame[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0, 0, 48, 40], [0, 0, 30, 20]]
    expected = predictor.predict([rgb(p) for p in paths])
    np.testing.assert_allclose(probabilities(frame), probabilities(expected), rtol=0, atol=1e-6)


def test_image_listing_is_sorted_by_suffix_any_case_and_recursive_on_request(tmp_path):
    for name in ("b.png", "a.JPEG", "z/y.webp", "c.tiff", "d.txt", "e.png.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == ["a.JPEG", "b.png", "c.tiff"]
    assert list_images(tmp_path, recursive=True) == ["a.JPEG", "b.png", "c.tiff", "z/y.webp"]


def test_unreadable_files_and_images_without_a_person_are_counted_in_one_summary_line(
    tmp_path, checkpoint, predictor, caplog
):
    folder = tmp_path / "unreadable"
    write_photo(folder / "a.png", 1)
    write_photo(folder / "c.png", 3)  # not in the boxes table: no person
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,x1,y1,x2,y2\na.png,1,1,20,20\nbroken.jpg,1,1,5,5\n")
    with caplog.at_level(logging.INFO, logger="ccim_lightning"):
        out, report = predict_files(checkpoint, folder, boxes=boxes, progress=False, predictor=predictor)
    assert pd.read_csv(out)["file"].tolist() == ["a.png"]
    assert report.unreadable == ["broken.jpg"] and report.without_person == ["c.png"]
    summaries = [r.getMessage() for r in caplog.records if "written to" in r.getMessage()]
    assert summaries == [
        f"ccim predict-files: 1 person(s) in 1 of 3 image(s) written to {out}; skipped 1 unreadable image(s) "
        "(broken.jpg), 1 image(s) without a person (c.png)"
    ]
    assert any("broken.jpg is skipped" in r.getMessage() for r in caplog.records)


def test_a_boxes_row_naming_a_missing_file_is_an_error_naming_the_row(tmp_path, checkpoint, predictor):
    folder = tmp_path / "missing"
    write_photo(folder / "a.png", 1)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,x1,y1,x2,y2\na.png,1,1,20,20\ngone.png,1,1,5,5\n")
    with pytest.raises(PredictFilesError, match=r"boxes.csv line 3: file 'gone.png' is not an image of .*missing"):
        predict_files(checkpoint, folder, boxes=boxes, progress=False, predictor=predictor)
    assert not (checkpoint.parents[1] / "predictions" / "missing.csv").exists()  # stopped before writing


def test_a_box_outside_its_image_is_an_error_and_leaves_no_partial_file(tmp_path, checkpoint, predictor):
    folder = tmp_path / "photos"
    write_photo(folder / "a.png", 1)
    write_photo(folder / "b.png", 2)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,x1,y1,x2,y2\na.png,1,1,20,20\nb.png,47.5,1,80,20\n")
    out = tmp_path / "p.csv"
    with pytest.raises(
        PredictFilesError, match=r"line 3: box \(47.5, 1.0, 80.0, 20.0\) has less than one pixel inside"
    ):
        predict_files(checkpoint, folder, boxes=boxes, out=out, batch_size=1, progress=False, predictor=predictor)
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "key", "match"),
    [
        ("name,x1,y1,x2,y2\na.png,0,0,1,1\n", "file", "missing column.*file"),
        ("file,x1,y1,x2\na.png,0,0,1\n", "file", "missing column.*y2"),
        ("file,x1,y1,x2,y2\na.png,0,0,one,1\n", "file", "line 2: a box value is not a number"),
        ("file,x1,y1,x2,y2\na.png,0,0,1,1\na.png,5,0,1,1\n", "file", r"line 3: box .* is not x1 < x2"),
        ("file,x1,y1,x2,y2\na.png,0,0,nan,1\n", "file", "line 2: box .* finite"),
        ("frame,x1,y1,x2,y2\n-1,0,0,1,1\n", "frame", "line 2: frame '-1' is not a frame number"),
        ("file,x1,y1,x2,y2\n,0,0,1,1\n", "file", "line 2: empty file name"),
    ],
)
def test_bad_boxes_tables_are_errors_naming_the_line(tmp_path, text, key, match):
    path = tmp_path / "boxes.csv"
    path.write_text(text)
    with pytest.raises(PredictFilesError, match=match):
        read_boxes_table(path, key)


def test_inputs_that_are_neither_a_folder_nor_a_video_and_video_without_opencv(tmp_path, monkeypatch):
    weights = tmp_path / "any.ckpt"  # these checks come before the checkpoint is read
    weights.write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(PredictFilesError, match=r"--input .*notes.txt: neither a folder nor a video \(.avi"):
        predict_files(weights, tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="--input .*gone.avi does not exist"):
        predict_files(weights, tmp_path / "gone.avi")
    with pytest.raises(PredictFilesError, match="give either --boxes or --detector"):
        predict_files(weights, tmp_path, boxes=tmp_path / "b.csv", detector="bodies")
    with pytest.raises(PredictFilesError, match="--stride 2 is for videos; .* is a folder"):
        predict_files(weights, tmp_path, stride=2)
    write_video(tmp_path / "v.avi", COLOURS[:2])
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(
        MissingOpenCVError, match=r"reading a video needs OpenCV.*pip install 'ccim-lightning\[detect\]'"
    ):
        predict_files(weights, tmp_path / "v.avi")


# --- the output file -----------------------------------------------------------------------------------------------
def test_the_output_file_is_never_overwritten(tmp_path, checkpoint, predictor):
    folder = tmp_path / "twice"
    write_photo(folder / "a.png", 1)
    first, _ = predict_files(checkpoint, folder, progress=False, predictor=predictor)
    second, _ = predict_files(checkpoint, folder, progress=False, predictor=predictor)
    assert first.name == "twice.csv" and second == first.with_name("twice_2.csv")
    assert default_output_path(checkpoint, folder) == first.with_name("twice_3.csv")
    pd.testing.assert_frame_equal(pd.read_csv(first), pd.read_csv(second))

    mine = tmp_path / "mine.csv"
    mine.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="mine.csv already exists and is not overwritten"):
        predict_files(checkpoint, folder, out=mine, progress=False, predictor=predictor)
    assert mine.read_text() == "keep me\n"


def test_the_ccim_command_runs_predict_files_and_reports_errors_in_one_line(tmp_path, checkpoint, capsys):
    assert "predict-files" in SUBCOMMANDS
    folder = tmp_path / "photos"
    write_photo(folder / "a.png", 1)
    out = tmp_path / "cli.csv"
    args = ["predict-files", "--ckpt_path", str(checkpoint), "--input", str(folder), "--out", str(out)]
    ccim_main([*args, "--device", "cpu", "--no-progress"])
    assert pd.read_csv(out)["file"].tolist() == ["a.png"]
    with pytest.raises(SystemExit, match="ccim: error: predict-files: --out .*cli.csv already exists"):
        ccim_main([*args, "--no-progress"])
    with pytest.raises(SystemExit, match="give either --boxes or --detector"):
        ccim_main([*args[:-2], "--boxes", str(tmp_path / "b.csv"), "--detector", "faces"])


# --- a video -------------------------------------------------------------------------------------------------------
def write_video(path, colours, size=(64, 48)):
    """An MJPG .avi whose frame i is a flat image of ``colours[i]`` (RGB): the colour tells which frame it is."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for colour in colours:
        writer.write(np.full((size[1], size[0], 3), colour[::-1], dtype=np.uint8))  # OpenCV writes BGR
    writer.release()
    return path


COLOURS = [(20 * i, 255 - 20 * i, (70 * i) % 256) for i in range(11)]


def test_video_frames_by_stride_with_their_numbers(tmp_path):
    from ccim_lightning.inference.video import VideoFrames

    frames = VideoFrames(write_video(tmp_path / "v.avi", COLOURS), stride=4)
    got = list(frames)
    assert [n for n, _ in got] == [0, 4, 8]
    for number, frame in got:  # JPEG-compressed flat colours come back within a few levels
        assert frame.shape == (48, 64, 3)
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(axis=0), COLOURS[number], atol=6)
    assert frames.frames_read == 11 and frames.reported_frames == 11 and frames.expected_count() == 3
    with pytest.raises(ValueError, match="--stride must be 1 or more"):
        VideoFrames(tmp_path / "v.avi", stride=0)
    (tmp_path / "bad.avi").write_bytes(b"RIFF not a video")
    with pytest.raises(ValueError, match="OpenCV cannot open .*bad.avi as a video"):
        VideoFrames(tmp_path / "bad.avi")


def test_video_by_stride_writes_frame_numbers_and_the_predictor_probabilities(tmp_path, checkpoint, predictor):
    from ccim_lightning.inference.video import VideoFrames

    video = write_video(tmp_path / "clip.avi", COLOURS)
    out, report = predict_files(checkpoint, video, stride=3, progress=False, predictor=predictor, batch_size=2)
    assert out == checkpoint.parents[1] / "predictions" / "clip.csv"
    frame = pd.read_csv(out)
    assert list(frame.columns)[:6] == ["frame", *KEY_AND_BOX]
    assert frame["frame"].tolist() == [0, 3, 6, 9]
    decoded = [image for _, image in VideoFrames(video, stride=3)]
    np.testing.assert_allclose(probabilities(frame), probabilities(predictor.predict(decoded)), rtol=0, atol=1e-6)
    assert (report.read, report.persons) == (4, 4)


def test_video_boxes_by_frame_and_frames_off_the_stride_or_past_the_end_are_errors(tmp_path, checkpoint, predictor):
    video = write_video(tmp_path / "boxed.avi", COLOURS)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("frame,x1,y1,x2,y2\n6,0,0,30,30\n0,10,10,60,40\n6,30,0,64,48\n")
    out, report = predict_files(checkpoint, video, boxes=boxes, stride=3, progress=False, predictor=predictor)
    frame = pd.read_csv(out)
    assert frame[["frame", "x1"]].to_numpy().tolist() == [[0, 10], [6, 0], [6, 30]]
    assert report.without_person == ["3", "9"]

    boxes.write_text("frame,x1,y1,x2,y2\n0,0,0,30,30\n4,0,0,30,30\n")
    with pytest.raises(PredictFilesError, match=r"line 3: frame 4 is not read with --stride 3"):
        predict_files(checkpoint, video, boxes=boxes, stride=3, progress=False, predictor=predictor)
    boxes.write_text("frame,x1,y1,x2,y2\n0,0,0,30,30\n12,0,0,30,30\n")
    with pytest.raises(PredictFilesError, match=r"line 3: frame 12 is beyond the video's 11 frames"):
        predict_files(checkpoint, video, boxes=boxes, stride=3, progress=False, predictor=predictor)


def test_no_person_found_is_counted_not_a_crash(tmp_path, checkpoint, predictor, caplog):
    video = write_video(tmp_path / "empty.avi", COLOURS[:5])  # flat colours: no face anywhere
    with caplog.at_level(logging.INFO, logger="ccim_lightning"):
        out, report = predict_files(checkpoint, video, detector="faces", progress=False, predictor=predictor)
    assert report.without_person == ["0", "1", "2", "3", "4"] and report.persons == 0
    empty = pd.read_csv(out)
    assert empty.empty and list(empty.columns) == ["frame", *KEY_AND_BOX, *CLASSES, "prediction"]
    assert "skipped 0 unreadable frame(s), 5 frame(s) without a person (0, 1, 2, 3, 4)" in caplog.text
