"""Kept-token trace files (vlmprune.trace): the engine writes them, the gateway pops them."""

from __future__ import annotations

import pytest

from vlmprune.trace import check_trace_id, pop_trace, write_trace


@pytest.mark.parametrize("bad", ["short", "../../etc/passwd", "a" * 65, "has space1", "", None, 12345678],
                         ids=["short", "path", "long", "space", "empty", "none", "int"])
def test_trace_ids_are_plain_file_names(bad):
    """8-64 characters of A-Za-z0-9_-: never a path, never empty; the error names where it came from."""
    with pytest.raises(ValueError, match="header X"):
        check_trace_id(bad, "header X")
    assert check_trace_id("run_0001-x") == "run_0001-x"


def test_pop_waits_for_every_image_then_removes_the_files(tmp_path):
    """None until every image's record exists; then the records in image order, and the files are gone."""
    write_trace(tmp_path, "run-0001", 1, {"kept": [3, 4]})
    assert pop_trace(tmp_path, "run-0001", 2) is None
    write_trace(tmp_path, "run-0001", 0, {"kept": [0]})
    records = pop_trace(tmp_path, "run-0001", 2)
    assert records == [{"image": 0, "kept": [0]}, {"image": 1, "kept": [3, 4]}]
    assert list(tmp_path.iterdir()) == []
    assert pop_trace(tmp_path, "run-0001", 2) is None
