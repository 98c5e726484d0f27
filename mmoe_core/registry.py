"""The one family registry: loading, training, the demo build and every CLI ask it, and nothing else.

A family is a package under ``mmoe_core/families/<name>/`` whose ``__init__`` calls :func:`register`
with a :class:`Family`; the built-in packages are found by listing that folder (no list to keep in
sync). A family defined elsewhere (a test's toy family, a user's plug-in) calls :func:`register` itself.

Which family opens a checkpoint directory: ``config.json``'s ``"family"`` key names it (MoEscope's own
checkpoints); a directory without one (a Hugging Face model folder, say) goes to the first family
whose ``recognises(path)`` says yes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the adapter module imports this one lazily; no cycle at run time
    from mmoe_core.adapter import ModelAdapter


@dataclass(frozen=True)
class DemoRun:
    """One run the demo build makes: train a checkpoint from a data world, then precompute it."""

    name: str  # the run: artifacts/checkpoints/<name>, artifacts/runs/<name>
    family: str
    world: str  # a registered World: its data under artifacts/data/<world>
    fingerprint: Mapping[str, Any]  # JSON-able: what makes the run; a change rebuilds it
    train: Callable[[Path, Path, str, bool], None]  # (data_dir, ckpt_dir, scale, progress) -> writes ckpt_dir
    precompute: Mapping[str, Any] = field(default_factory=dict)  # analysis.precompute options (split, ...)
    description: str = ""
    cost: float = 0.0  # relative build time (seconds or steps): parallel builds start the costliest


@dataclass(frozen=True)
class World:
    """A generated data world with ground truth (written in a real dataset layout)."""

    name: str
    build: Callable[[Path, str, int], None]  # (out_dir, scale, seed): write the world
    is_built: Callable[[Path, str, int], bool]  # (out_dir, scale, seed): already there, same scale and seed
    description: str = ""


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # in words, for the pages and CLIs
    adapter: type  # a ModelAdapter subclass
    build_model: Callable[[dict], torch.nn.Module] | None = None  # config.json -> model (random weights)
    trainer: Callable[[Any], Any] | None = None  # TrainOptions -> FamilyTrainer
    # (ckpt_dir, device, snapshot) -> adapter; default: config.json + model.safetensors into build_model
    load: Callable[..., ModelAdapter] | None = None
    recognises: Callable[[Path], bool] | None = None  # a foreign checkpoint layout this family opens
    # (config.json, where) -> raises ConfigError: the family's type and range checks of an untrusted config
    check_config: Callable[[dict, str], None] | None = None
    demo_runs: Callable[[str], list[DemoRun]] | None = None  # scale ("default" | "tiny") -> its demo runs


_FAMILIES: dict[str, Family] = {}
_WORLDS: dict[str, World] = {}
_BUILTINS_LOADED = False
# Modules that register built-in entries besides the family packages (imported by name: they import
# this module, and this module must not import them back).
_BUILTIN_MODULES = ("mmoe_core.data.worlds",)


def register(family: Family) -> Family:
    """Add (or replace) a family. Returns it, so a package can keep a handle."""
    _FAMILIES[family.name] = family
    return family


def register_world(world: World) -> World:
    _WORLDS[world.name] = world
    return world


def worlds() -> dict[str, World]:
    _load_builtins()
    return dict(_WORLDS)


def demo_runs(scale: str) -> list[DemoRun]:
    """Every registered family's demo runs, in family-name order."""
    _load_builtins()
    return [
        run
        for name in sorted(_FAMILIES)
        if _FAMILIES[name].demo_runs is not None
        for run in _FAMILIES[name].demo_runs(scale)
    ]


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for name in _BUILTIN_MODULES:
        importlib.import_module(name)
    import mmoe_core.families as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def families() -> list[str]:
    _load_builtins()
    return sorted(_FAMILIES)


def get(name: str) -> Family:
    _load_builtins()
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(sorted(_FAMILIES)) or 'none'}")
    return _FAMILIES[name]


def build_model(config: dict) -> torch.nn.Module:
    family = get(str(config.get("family")))
    if family.build_model is None:
        raise ValueError(f"the {family.name!r} family builds its models in its own load()")
    return family.build_model(config)


def family_for_checkpoint(ckpt_dir: Path) -> Family:
    """The family that opens ``ckpt_dir`` (see the module docstring); a CheckpointError when none does."""
    from mmoe_core.checkpoint import MAX_CONFIG_BYTES, CheckpointError, check_dir, read_json_file

    _load_builtins()
    ckpt_dir = check_dir(Path(ckpt_dir))
    config_path = ckpt_dir / "config.json"
    if config_path.is_file():
        config = read_json_file(config_path, MAX_CONFIG_BYTES)
        if isinstance(config, dict) and "family" in config:
            if config["family"] not in _FAMILIES:
                raise CheckpointError(
                    f"{config_path}: family {config['family']!r} is not a registered model family "
                    f"({', '.join(sorted(_FAMILIES))}); the file is damaged or from a plug-in "
                    "that is not installed"
                )
            return _FAMILIES[config["family"]]
    for family in _FAMILIES.values():
        if family.recognises is not None and family.recognises(ckpt_dir):
            return family
    raise CheckpointError(
        f"{ckpt_dir} is not a checkpoint any family opens (no config.json with a 'family', and no "
        f"family recognises its layout; families: {', '.join(sorted(_FAMILIES))})"
    )


def check_config(config: dict, source: str, purpose: str = "load", device=None) -> torch.nn.Module | None:
    """Check an untrusted config.json before anything is allocated: the family's type and range checks,
    then its model built on the meta device, counted, and weighed against the memory budget
    (:mod:`mmoe_core.limits`). Returns that meta model (its state-dict shapes check a weights file);
    None for a family that builds its models in its own load(). Raises ConfigError with the numbers."""
    from mmoe_core.errors import ConfigError
    from mmoe_core.limits import check_footprint, meta_footprint

    family = get(str(config.get("family")))
    if family.check_config is not None:
        family.check_config(config, source)
    if family.build_model is None:
        return None
    try:
        model, footprint = meta_footprint(lambda: family.build_model(config))
    except (ValueError, KeyError) as exc:  # the constructor's own consistency checks
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: the model section does not make a {family.name} model: {exc}") from exc
    check_footprint(footprint, source, purpose, device)
    return model


def load_own_checkpoint(family: Family, ckpt_dir: Path, device, snapshot: int | None = None) -> ModelAdapter:
    """The default load(): MoEscope's own layout (config.json + model.safetensors [+ snapshots])."""
    from mmoe_core.checkpoint import CONFIG_NAME, check_fits, checked_header, load_config, load_into, load_state

    config = load_config(ckpt_dir)
    header = checked_header(ckpt_dir, snapshot)
    meta = check_config(config, str(Path(ckpt_dir) / CONFIG_NAME), "load", device)
    if meta is not None:
        check_fits({k: tuple(v.shape) for k, v in meta.state_dict().items()}, header, str(ckpt_dir))
    model = build_model(config)
    load_into(model, load_state(ckpt_dir, snapshot), source=str(ckpt_dir))
    return family.adapter(model, config, device)
