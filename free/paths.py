"""Where the project lives. A leaf module (standard library only): the config loader, the stack and
the CLI all resolve relative folders against the same root, so a command works from any directory.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR_ENV = "FREE_CONFIG_DIR"


def project_root() -> Path:
    """The checkout ``free`` runs from: the folder above ``$FREE_CONFIG_DIR`` when that is set, else
    the folder above the ``free`` package (an editable install or ``python -m free`` in a checkout)."""
    configured = os.environ.get(CONFIG_DIR_ENV)
    return Path(configured).resolve().parent if configured else Path(__file__).resolve().parents[1]


def in_project(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when absolute, else that folder under :func:`project_root` (not the cwd)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path
