"""One package per model family; each registers itself with :mod:`mmoe_core.registry` on import."""
