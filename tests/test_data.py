"""Text data: every unreadable, empty or missing file is one DataError, never a datasets traceback."""

import pytest

from relufy.data import load_text_dataset
from relufy.errors import DataError


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is an empty file"),
    ("binary.txt", bytes(range(128, 256)) * 20, r"could not be read as text \(UnicodeDecodeError\)"),
    ("binary.jsonl", bytes(range(128, 256)) * 20, "could not be read as json"),
])
def test_empty_and_binary_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_text_dataset(str(path))


def test_a_missing_local_file_is_file_not_found_not_a_network_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data file 'data/nope.txt' does not exist \(relative to "):
        load_text_dataset("data/nope.txt")
