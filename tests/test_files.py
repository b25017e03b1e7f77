"""megafold.files.atomic_open: whole files or none."""

import os

import pytest

from megafold.files import atomic_open


def test_the_file_appears_whole_and_readable(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_open(path, "w") as handle:
        handle.write("first")
        assert not path.exists()  # nothing at the target until the block ends
    assert path.read_text() == "first"
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
