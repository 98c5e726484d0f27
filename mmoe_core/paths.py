"""Where the project keeps generated files.

``artifacts_root()`` is ``<repo>/artifacts`` unless the environment variable ``MOESCOPE_ARTIFACTS``
points elsewhere (tests, a shared cache, a read-only deployment).
"""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACTS_ENV = "MOESCOPE_ARTIFACTS"
REPO_ROOT = Path(__file__).resolve().parent.parent


def artifacts_root() -> Path:
    """The artifacts folder: ``$MOESCOPE_ARTIFACTS`` if set (and non-empty), else ``<repo>/artifacts``."""
    override = os.environ.get(ARTIFACTS_ENV, "").strip()
    return Path(override).expanduser() if override else REPO_ROOT / "artifacts"


def demo_world_dir(world: str) -> Path:
    """Folder of a generated demo world: ``<artifacts>/data/<world>`` (``entity`` or ``qa``)."""
    return artifacts_root() / "data" / world
