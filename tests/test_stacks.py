"""Stacks of planes (time-lapses, z-stacks, hyperstacks): cut into planes, each predicted as an image, the planes'
label images put back together as one label stack."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from nucleus_seg.cli.predict import main
from nucleus_seg.data.io import ImageReadError, pixel_size_um, read_image
from nucleus_seg.data.stacks import split_stack, stack_planes


def test_stack_planes_names_the_plane_axes_of_a_stack_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "movie.tif", rng.integers(0, 9, (3, 24, 32), dtype=np.uint16), imagej=True,
                     metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "hyper.tif", np.zeros((2, 3, 2, 24, 32), np.uint16), imagej=True,
                     metadata={"axes": "TZCYX"})
    tifffile.imwrite(tmp_path / "one_slice.tif", np.zeros((1, 2, 24, 32), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "composite.tif", np.zeros((2, 24, 32), np.uint16), imagej=True,
                     metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((24, 32), np.uint16))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    assert stack_planes(tmp_path / "movie.tif") == ("T", (3,))
    assert stack_planes(tmp_path / "hyper.tif") == ("TZ", (2, 3))
    for name in ("one_slice.tif", "composite.tif", "plain.tif", "broken.tif", "absent.tif"):
        assert stack_planes(tmp_path / name) is None, name


def test_split_stack_writes_each_plane_with_its_channels_and_pixel_size(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, (2, 3, 2, 24, 32), dtype=np.uint16)  # T, Z, C, Y, X
    tifffile.imwrite(tmp_path / "hyper.tif", stack, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": "TZCYX", "unit": "um"})
    with pytest.raises(ImageReadError, match="hyper.tif: a stack of 2-D images"):
        read_image(tmp_path / "hyper.tif")
    split = split_stack(tmp_path / "hyper.tif", tmp_path / "planes")
    assert (split.axes, split.sizes) == ("TZ", (2, 3))
    assert [p.name for p in split.planes] == [f"hyper_t{t}z{z}.tif" for t in range(2) for z in range(3)]
    for plane, (t, z) in zip(split.planes, np.ndindex(2, 3)):
        np.testing.assert_array_equal(read_image(plane), np.moveaxis(stack[t, z], 0, -1))  # channels last
        assert pixel_size_um(plane) == pytest.approx((0.5, 0.5))
    tifffile.imwrite(tmp_path / "long.tif", np.zeros((12, 8, 8), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    names = [p.stem for p in split_stack(tmp_path / "long.tif", tmp_path / "planes").planes]
    assert names[:2] == ["long_z00", "long_z01"] and names[-1] == "long_z11"  # sorted as numbered


def test_nucleus_predict_predicts_each_plane_and_writes_a_label_stack(cli_cfg, tmp_path, capsys):
    """A 3-frame time-lapse and a 2x2 T/Z hyperstack: every plane gets the outputs a single image gets, equal to
    that plane predicted as an image of its own; the label stacks hold them with the stacks' axes and pixel size;
    no plane file is left behind."""
    from test_predict_cli import random_weights
    from test_predictor import blobs

    weights = ["MODEL.WEIGHTS", str(random_weights(cli_cfg, tmp_path))]
    frames = np.stack([blobs((96, 112), np.uint16, seed=s) for s in range(3)])
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "movie.tif", frames, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"axes": "TYX", "unit": "um"})
    tifffile.imwrite(inputs / "hyper.tif", np.stack([frames[:2], frames[1:]]), imagej=True,
                     metadata={"axes": "TZYX"})
    tifffile.imwrite(inputs / "single.tif", frames[2])
    out = tmp_path / "out"
    base = ["--config-file", str(cli_cfg), "--diameter", "0", *weights]
    assert main([*base, "--input", str(inputs), "--output", str(out)]) == 0
    assert "3 planes (T), each predicted" in capsys.readouterr().err
    assert not (out / ".planes").exists()
    alone = tmp_path / "alone"
    assert main([*base, "--input", str(inputs / "single.tif"), "--output", str(alone), "--formats", "labels"]) == 0
    single = tifffile.imread(alone / "single_labels.tif")
    assert single.max() > 0
    np.testing.assert_array_equal(tifffile.imread(out / "movie_t2_labels.tif"), single)
    for t in range(3):
        assert (out / f"movie_t{t}_overlay.png").is_file() and (out / f"movie_t{t}_measurements.csv").is_file()
    with tifffile.TiffFile(out / "movie_labels.tif") as tif:
        assert tif.series[0].axes == "TYX"
        movie = tif.asarray()
    assert movie.shape == (3, 96, 112)
    for t in range(3):
        np.testing.assert_array_equal(movie[t], tifffile.imread(out / f"movie_t{t}_labels.tif"))
    assert pixel_size_um(out / "movie_labels.tif") == pytest.approx((0.25, 0.25))
    with tifffile.TiffFile(out / "hyper_labels.tif") as tif:
        assert tif.series[0].axes == "TZYX"
        hyper = tif.asarray()
    np.testing.assert_array_equal(hyper[1, 1], single)  # t1 z1 is frame 2
    np.testing.assert_array_equal(hyper[0, 1], movie[1])
    submission = (out / "submission.csv").read_text()
    assert "movie_t0," in submission and "hyper_t1z1," in submission
    # --resume: no plane is predicted again; the label stack is put together again from the planes' files
    (out / "movie_labels.tif").unlink()
    before = (out / "movie_t1_labels.tif").stat().st_mtime_ns
    assert main([*base, "--input", str(inputs), "--output", str(out), "--resume"]) == 0
    assert (out / "movie_t1_labels.tif").stat().st_mtime_ns == before
    np.testing.assert_array_equal(tifffile.imread(out / "movie_labels.tif"), movie)


def test_a_stack_whose_plane_fails_names_the_stack_and_writes_no_label_stack(cli_cfg, tmp_path, capsys,
                                                                            monkeypatch):
    from test_predict_cli import random_weights
    from test_predictor import blobs

    from nucleus_seg.inference import batch

    frames = np.stack([blobs((64, 80), np.uint16, seed=s) for s in range(2)])
    tifffile.imwrite(tmp_path / "movie.tif", frames, imagej=True, metadata={"axes": "TYX"})
    real = batch.read_image

    def read(path):
        if path.stem == "movie_t1":
            raise ImageReadError(f"{path}: unreadable (injected)")
        return real(path)

    monkeypatch.setattr(batch, "read_image", read)
    out = tmp_path / "out"
    assert main(["--config-file", str(cli_cfg), "--diameter", "0", "--input", str(tmp_path / "movie.tif"),
                 "--output", str(out), "MODEL.WEIGHTS", str(random_weights(cli_cfg, tmp_path))]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'movie.tif'} (plane t1): unreadable (injected)" in err
    assert "1 of 2 planes have no label image: no label stack written" in err
    assert (out / "movie_t0_labels.tif").is_file() and not (out / "movie_labels.tif").exists()
    assert ".planes" not in err.split("failed:")[1]


def test_a_plane_named_like_another_input_is_a_usage_error(cli_cfg, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((2, 32, 32), np.uint16), imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "movie_t1.tif", np.zeros((32, 32), np.uint16))
    with pytest.raises(SystemExit) as exc:
        main(["--config-file", str(cli_cfg), "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exc.value.code == 2 and "movie_t1.tif and a plane of" in capsys.readouterr().err
    assert not (tmp_path / "out" / ".planes").exists()  # found before any plane was written
