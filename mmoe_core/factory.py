"""Model configs and demo recipes are JSON data; this one factory reads them (as open_clip's
``model_configs/*.json`` + ``create_model``).

Model configs
-------------
``mmoe_core/families/<family>/model_configs/<name>.json`` (or any file or folder given to
:func:`add_model_config`)::

    {"family": "mmoe", "model": {...the "model" section of a checkpoint's config.json...}, "notes": [...]}

Names are unique over all folders. :func:`get_model_config` returns ``{"family", "model"}`` with
overrides applied to the model section; :func:`create_model` builds it with random weights through the
family's registered ``build_model``. A trainer starts from one when its family options name it
(``family_options["model_config"]``, CLI ``--model-config NAME``); see :func:`split_model_options`.

Demo recipes
------------
``mmoe_core/families/<family>/recipes/<run>.json``, one demo run each (files starting with ``_`` are
shared bases, not runs)::

    {"run": "mmoe-balanced", "world": "entity", "description": "...", "notes": ["why ..."],
     "extends": "_base",                       # optional: a base file of the same folder, merged under this one
     "options": {...TrainOptions fields...},   # at the default scale
     "precompute": {...analysis.precompute options...},
     "scales": {"tiny": {"options": {...overrides...}, "precompute": {...overrides...}}},
     "build_seconds": 230}                     # optional: measured train + precompute seconds (one core),
                                               # the parallel demo build's scheduling weight

Merging (``extends`` and scale overrides) is recursive for objects, replacement for everything else.
:func:`family_demo_runs` turns a family's recipes into :class:`mmoe_core.registry.DemoRun` entries. A
run's fingerprint holds its resolved options and the content of the model config it names, so editing
either JSON file rebuilds the run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmoe_core.errors import UserError

FAMILIES_DIR = Path(__file__).resolve().parent / "families"
MODEL_CONFIGS = "model_configs"
RECIPES = "recipes"
SCALES = ("default", "tiny")
MODEL_CONFIG_OPTION = "model_config"  # the family option naming the model config a trainer starts from

_EXTRA_CONFIG_PATHS: list[Path] = []


class FactoryError(UserError, ValueError):
    """A model config or recipe is missing, malformed or ambiguous; the message says which file."""


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``: objects merged key by key, any other value replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FactoryError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FactoryError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------


def add_model_config(path: str | Path) -> None:
    """Make the model configs of a file or folder (``*.json``) known, beside the built-in ones."""
    path = Path(path)
    if not path.exists():
        raise FactoryError(f"{path}: no such model config file or folder")
    if path not in _EXTRA_CONFIG_PATHS:
        _EXTRA_CONFIG_PATHS.append(path)


def _config_files() -> dict[str, Path]:
    files = sorted(FAMILIES_DIR.glob(f"*/{MODEL_CONFIGS}/*.json"))
    for extra in _EXTRA_CONFIG_PATHS:
        files += sorted(extra.glob("*.json")) if extra.is_dir() else [extra]
    out: dict[str, Path] = {}
    for path in files:
        if path.stem in out and out[path.stem] != path:
            raise FactoryError(f"model config {path.stem!r} is defined twice: {out[path.stem]} and {path}")
        out[path.stem] = path
    return out


def _read_model_config(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data.get("family"), str) or not isinstance(data.get("model"), dict):
        raise FactoryError(f'{path}: a model config needs a "family" string and a "model" object')
    return {"family": data["family"], "model": data["model"]}


def list_model_configs(family: str | None = None) -> list[str]:
    """Names of the known model configs (of one family when given), sorted."""
    files = _config_files()
    return sorted(
        name for name, path in files.items() if family is None or _read_model_config(path)["family"] == family
    )


def get_model_config(name: str, **overrides: Any) -> dict:
    """``{"family", "model"}`` of the named config, ``overrides`` replacing keys of its model section."""
    files = _config_files()
    if name not in files:
        raise FactoryError(f"unknown model config {name!r}; known: {', '.join(sorted(files)) or 'none'}")
    config = copy.deepcopy(_read_model_config(files[name]))
    config["model"].update(copy.deepcopy(overrides))
    return config


def create_model(name: str, **overrides: Any):
    """The named model with random weights (the family's ``build_model`` of :func:`get_model_config`)."""
    from mmoe_core.registry import build_model

    return build_model(get_model_config(name, **overrides))


def split_model_options(family: str, options: Mapping[str, Any]) -> tuple[dict, dict]:
    """(model section of the config ``options["model_config"]`` names, or {} when none; the other options).

    A trainer starts from the first and applies the second on top. The named config must belong to
    ``family``: a MoEMoE config cannot start an MMoE run."""
    rest = dict(options)
    name = rest.pop(MODEL_CONFIG_OPTION, None)
    if name is None:
        return {}, rest
    config = get_model_config(str(name))
    if config["family"] != family:
        raise FactoryError(f"model config {name!r} is a {config['family']!r} config, not {family!r}")
    return config["model"], rest


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One demo run: what to train (TrainOptions fields) on which world, and how to precompute it."""

    run: str
    world: str
    options: Mapping[str, Any]  # TrainOptions fields at the default scale
    scales: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # scale -> {"options", "precompute"}
    precompute: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""  # the JSON file it was read from
    build_seconds: float | None = None  # measured train + precompute seconds on one core, default scale

    def cost(self, scale: str) -> float:
        """The demo build's scheduling weight: the measured seconds at the default scale (runs of one
        family can cost very differently per step), the step count at other scales and when unmeasured."""
        if scale == "default" and self.build_seconds:
            return float(self.build_seconds)
        return float(self.resolved(scale).get("steps") or 0)

    @property
    def family(self) -> str:
        return str(self.options.get("family", ""))

    def _scale(self, scale: str) -> Mapping[str, Any]:
        if scale not in SCALES:
            raise FactoryError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
        return self.scales.get(scale, {}) if scale != "default" else {}

    def resolved(self, scale: str) -> dict:
        """The TrainOptions fields used at ``scale`` (without paths); ``family_options`` always present."""
        opts = deep_merge(self.options, self._scale(scale).get("options", {}))
        opts["family_options"] = dict(opts.get("family_options") or {})
        return opts

    def precompute_options(self, scale: str) -> dict:
        return deep_merge(self.precompute, self._scale(scale).get("precompute", {}))

    def model_config(self, scale: str) -> dict | None:
        """The content of the model config the run starts from (None when it names none)."""
        name = self.resolved(scale)["family_options"].get(MODEL_CONFIG_OPTION)
        return None if name is None else get_model_config(str(name))

    def fingerprint(self, scale: str) -> dict:
        """JSON-able: everything that makes the trained run (a change rebuilds it)."""
        return {
            "run": self.run,
            "world": self.world,
            "scale": scale,
            "options": self.resolved(scale),
            "model_config": self.model_config(scale),
        }


def _load_recipe_dict(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise FactoryError(f"{path}: 'extends' loops back: {' -> '.join(p.name for p in (*seen, path))}")
    data = _read_json(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = path.with_name(f"{base}.json")
    if not base_path.is_file():
        raise FactoryError(f"{path}: extends {base!r}, but {base_path} does not exist")
    return deep_merge(_load_recipe_dict(base_path, (*seen, path)), data)


_RECIPE_KEYS = {"run", "world", "options", "scales", "precompute", "description", "notes", "build_seconds"}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = _load_recipe_dict(path)
    unknown = sorted(set(data) - _RECIPE_KEYS)
    missing = sorted({"run", "world", "options"} - set(data))
    if unknown or missing:
        raise FactoryError(
            f"{path}: "
            + "; ".join(
                filter(
                    None, [f"unknown keys {unknown}" if unknown else "", f"missing keys {missing}" if missing else ""]
                )
            )
        )
    if not data["options"].get("family"):
        raise FactoryError(f"{path}: options.family is missing")
    seconds = data.get("build_seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0):
        raise FactoryError(f"{path}: build_seconds must be a positive number of seconds, got {seconds!r}")
    bad_scales = sorted(set(data.get("scales", {})) - set(SCALES))
    if bad_scales:
        raise FactoryError(f"{path}: unknown scales {bad_scales}; scales: {', '.join(SCALES)}")
    return Recipe(
        run=data["run"],
        world=data["world"],
        options=data["options"],
        scales=data.get("scales", {}),
        precompute=data.get("precompute", {}),
        description=data.get("description", ""),
        source=str(path),
        build_seconds=data.get("build_seconds"),
    )


def load_recipes(folder: str | Path) -> list[Recipe]:
    """Every recipe of a folder (``*.json`` not starting with ``_``), in file-name order."""
    recipes = [load_recipe(p) for p in sorted(Path(folder).glob("*.json")) if not p.name.startswith("_")]
    names = [r.run for r in recipes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FactoryError(f"{folder}: runs defined twice: {duplicates}")
    return recipes


def family_recipes(family: str) -> list[Recipe]:
    """The recipes of a built-in family package (``mmoe_core/families/<family>/recipes/``)."""
    folder = FAMILIES_DIR / family / RECIPES
    return load_recipes(folder) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Training a recipe, and the registry's demo runs
# ---------------------------------------------------------------------------------------------


def train_options(recipe: Recipe, scale: str, data_dir: str | Path, out_dir: str | Path, progress: bool = True):
    from mmoe_core.training import TrainOptions

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = recipe.resolved(scale)
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise FactoryError(f"recipe {recipe.run} ({recipe.source}): unknown training options {unknown}")
    return TrainOptions(**{**opts, "data_dir": str(data_dir), "out_dir": str(out_dir), "progress": progress})


def train_recipe(recipe: Recipe, data_dir: str | Path, ckpt_dir: str | Path, scale: str, progress: bool = True):
    """Train the recipe's run into ``ckpt_dir``; its fingerprint and description go into config.json's
    ``training`` section. Returns the loop's TrainResult."""
    from mmoe_core.training import get_trainer, train

    options = train_options(recipe, scale, data_dir, ckpt_dir, progress)
    return train(
        get_trainer(options.family)(options),
        options,
        Path(ckpt_dir),
        extra_config={"recipe": recipe.fingerprint(scale), "description": recipe.description},
    )


def _train_demo_run(recipe: Recipe, data_dir: Path, ckpt_dir: Path, scale: str, progress: bool) -> None:
    train_recipe(recipe, data_dir, ckpt_dir, scale, progress)


def demo_run(recipe: Recipe, scale: str):
    """The :class:`mmoe_core.registry.DemoRun` of a recipe at ``scale``."""
    from mmoe_core.registry import DemoRun

    return DemoRun(
        name=recipe.run,
        family=recipe.family,
        world=recipe.world,
        fingerprint=recipe.fingerprint(scale),
        train=functools.partial(_train_demo_run, recipe),
        precompute=recipe.precompute_options(scale),
        description=recipe.description,
        cost=recipe.cost(scale),
    )


def _demo_runs(family: str, scale: str) -> list:
    return [demo_run(r, scale) for r in family_recipes(family)]


def family_demo_runs(family: str) -> Callable[[str], list]:
    """``Family.demo_runs`` of a built-in family: scale -> the DemoRuns of its JSON recipes."""
    return functools.partial(_demo_runs, family)
