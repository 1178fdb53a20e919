"""Atomic output writers: complete files or none, with ordinary permissions."""

from __future__ import annotations

import json
import os

import pytest

from ctcovid.io.atomic import write_bytes_atomic, write_json_atomic


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: other users can read results


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    path = write_bytes_atomic(b"old", tmp_path / "x.bin")
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)  # not JSON-serialisable: fails mid-write
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
