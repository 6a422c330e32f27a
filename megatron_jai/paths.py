"""Where the read-only shared data lives: ``$JAI_SHARED_DIR``, default ``../shared`` from the repo."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_dir() -> str:
    return os.path.abspath(os.environ.get("JAI_SHARED_DIR", os.path.join(REPO_ROOT, "..", "shared")))


def shared_path(*parts: str) -> str:
    return os.path.join(shared_dir(), *parts)
