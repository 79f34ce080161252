"""Where relufy's shipped data lives: the wheel's copy under relufy/_data, else the source checkout's."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parents[1]


def project_file(relative: str) -> Path:
    """A file or folder of the project (`convert/architectures.yaml`, `evaluate/tasks`, `recipes`)."""
    packaged = _PACKAGE / "_data" / relative
    return packaged if packaged.exists() else _CHECKOUT / relative
