"""The one file-writing helper: atomic replacement, cleanup on failure, umask permissions, JSON/CSV."""

import json
import os
import stat

import numpy as np
import pytest

from TextureStarGANCore.fileio import (
    TEMP_MARKER,
    atomic_output,
    json_safe,
    write_bytes_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_output_replaces_in_one_step(tmp_path):
    target = tmp_path / "a.nii.gz"
    target.write_text("old")
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != target
        assert TEMP_MARKER in tmp.name
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_folder_output_replaces_an_existing_folder_whole(tmp_path):
    out = tmp_path / "series"
    out.mkdir()
    (out / "old.dcm").write_text("old")
    with atomic_output(out, folder=True) as tmp:
        assert tmp.is_dir()
        (tmp / "new.dcm").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.dcm"]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask_like_any_other_tool(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = [
            write_text_atomic(tmp_path / "a.md", "x"),
            write_bytes_atomic(tmp_path / "b.bin", b"x", fsync=True),
            write_json_atomic(tmp_path / "c.json", {"a": 1}),
            write_csv_atomic(tmp_path / "d.csv", ["a"], [[1]]),
        ]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_json_is_plain_and_nan_becomes_null(tmp_path):
    data = {"a": np.float32(1.5), "b": np.int64(3), "c": float("nan"), "d": np.arange(2), 4: (np.True_,)}
    assert json_safe(data) == {"a": 1.5, "b": 3, "c": None, "d": [0, 1], "4": [True]}
    path = write_json_atomic(tmp_path / "r.json", data)
    assert json.loads(path.read_text())["c"] is None


def test_csv_rows_are_written_as_given(tmp_path):
    path = write_csv_atomic(tmp_path / "t.csv", ["x", "y"], [[1, "a"], [2.5, ""]])
    assert path.read_text() == "x,y\n1,a\n2.5,\n"
