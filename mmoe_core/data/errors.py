"""The error every dataset reader raises for bad input (its own module, so that readers and the
picture checks of :mod:`mmoe_core.data.images` share it without importing each other)."""

from __future__ import annotations

from mmoe_core.errors import UserError


class DatasetError(UserError, ValueError):
    """Malformed or untrusted dataset input; the message names the file, the record and the field."""
