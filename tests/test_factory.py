"""Model configs and demo recipes as JSON data, read by mmoe_core.factory."""

from __future__ import annotations

import json

import pytest

from mmoe_core import factory
from mmoe_core.encoders import EncoderSpec
from mmoe_core.factory import FactoryError
from mmoe_core.families.mmoe.config import MMoEConfig, config_from_options


def test_model_configs_are_listed_and_read_with_overrides():
    names = factory.list_model_configs()
    assert {"mmoe-tiny-32", "mmoe-tiny-64", "moemoe-d16", "moemoe-d64"} <= set(names)
    assert factory.list_model_configs("mmoe") == ["mmoe-tiny-32", "mmoe-tiny-64"]
    config = factory.get_model_config("mmoe-tiny-32", top_k=2)
    assert set(config) == {"family", "model"} and config["family"] == "mmoe"
    assert config["model"]["top_k"] == 2 and factory.get_model_config("mmoe-tiny-32")["model"]["top_k"] == 3
    with pytest.raises(FactoryError, match="unknown model config 'nope'; known: .*mmoe-tiny-32"):
        factory.get_model_config("nope")


def test_create_model_builds_through_the_family():
    model = factory.create_model("mmoe-tiny-32", num_experts=2, top_k=1)
    assert type(model).__name__ == "MMoEModel" and model.cfg.num_experts == 2


def test_a_named_config_must_belong_to_the_trainer_family():
    named, rest = factory.split_model_options("mmoe", {"model_config": "mmoe-tiny-32", "per_name": 2})
    assert named["image_dim"] == 16 and rest == {"per_name": 2}
    assert factory.split_model_options("mmoe", {"per_name": 2}) == ({}, {"per_name": 2})
    with pytest.raises(FactoryError, match="is a 'moemoe' config, not 'mmoe'"):
        factory.split_model_options("mmoe", {"model_config": "moemoe-d16"})


def test_extra_model_config_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(factory, "_EXTRA_CONFIG_PATHS", [])
    (tmp_path / "mine.json").write_text(json.dumps({"family": "mmoe", "model": {"image_dim": 8}}))
    factory.add_model_config(tmp_path)
    assert factory.get_model_config("mine")["model"] == {"image_dim": 8}
    (tmp_path / "bad.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(FactoryError, match='needs a "family" string'):
        factory.get_model_config("bad")
    (tmp_path / "bad.json").unlink()


def test_deep_merge():
    base = {"a": 1, "o": {"x": 1, "y": {"p": 1}}, "l": [1, 2]}
    assert factory.deep_merge(base, {"o": {"y": {"q": 2}}, "l": [3]}) == {
        "a": 1,
        "o": {"x": 1, "y": {"p": 1, "q": 2}},
        "l": [3],
    }
    assert base["o"]["y"] == {"p": 1}  # not changed in place


def _write(folder, name, data):
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_recipes_extend_a_base_and_resolve_per_scale(tmp_path):
    _write(
        tmp_path,
        "_base",
        {
            "world": "entity",
            "options": {
                "family": "mmoe",
                "steps": 10,
                "lr": 0.1,
                "family_options": {"model_config": "mmoe-tiny-64", "per_name": 4},
            },
            "scales": {
                "tiny": {
                    "options": {"steps": 2, "family_options": {"model_config": "mmoe-tiny-32"}},
                    "precompute": {"attribution_sample": 4},
                }
            },
        },
    )
    _write(
        tmp_path,
        "run-a",
        {"run": "run-a", "extends": "_base", "options": {"lr": 0.2}, "scales": {"tiny": {"options": {"lr": 0.3}}}},
    )
    (recipe,) = factory.load_recipes(tmp_path)  # the base is not a run
    assert recipe.family == "mmoe" and recipe.world == "entity"
    assert recipe.resolved("default") == {
        "family": "mmoe",
        "steps": 10,
        "lr": 0.2,
        "family_options": {"model_config": "mmoe-tiny-64", "per_name": 4},
    }
    assert recipe.resolved("tiny") == {
        "family": "mmoe",
        "steps": 2,
        "lr": 0.3,
        "family_options": {"model_config": "mmoe-tiny-32", "per_name": 4},
    }
    assert recipe.precompute_options("tiny") == {"attribution_sample": 4} and recipe.precompute_options("default") == {}
    fingerprint = recipe.fingerprint("tiny")
    assert fingerprint["model_config"] == factory.get_model_config("mmoe-tiny-32")  # editing the config rebuilds
    json.dumps(fingerprint)
    with pytest.raises(FactoryError, match="unknown scale"):
        recipe.resolved("huge")


def test_bad_recipes_say_which_file(tmp_path):
    _write(tmp_path, "a", {"run": "a", "world": "entity", "options": {"family": "mmoe"}, "typo": 1})
    with pytest.raises(FactoryError, match=r"a\.json: unknown keys \['typo'\]"):
        factory.load_recipes(tmp_path)
    _write(tmp_path, "a", {"run": "a", "extends": "b", "world": "w", "options": {"family": "mmoe"}})
    _write(tmp_path, "b", {"extends": "a"})
    with pytest.raises(FactoryError, match="loops back"):
        factory.load_recipe(tmp_path / "a.json")
    _write(tmp_path, "a", {"run": "a", "world": "w", "options": {"family": "mmoe", "stepz": 3}})
    (tmp_path / "b.json").unlink()
    with pytest.raises(FactoryError, match=r"unknown training options \['stepz'\]"):
        factory.train_options(factory.load_recipe(tmp_path / "a.json"), "default", tmp_path, tmp_path)


def test_build_seconds_weigh_the_default_scale_and_steps_the_others(tmp_path):
    _write(tmp_path, "a", {"run": "a", "world": "w", "options": {"family": "mmoe", "steps": 200}, "build_seconds": 170})
    _write(tmp_path, "b", {"run": "b", "world": "w", "options": {"family": "mmoe", "steps": 400}})
    a, b = factory.load_recipes(tmp_path)
    assert a.cost("default") == 170.0 and a.cost("tiny") == 200.0  # measured seconds only where measured
    assert b.cost("default") == 400.0
    for bad in (0, -3, "fast", True):
        _write(tmp_path, "a", {"run": "a", "world": "w", "options": {"family": "mmoe"}, "build_seconds": bad})
        with pytest.raises(FactoryError, match="build_seconds must be a positive number"):
            factory.load_recipe(tmp_path / "a.json")


def test_every_demo_recipe_carries_its_measured_build_seconds():
    """The parallel demo build starts the costliest run first; its weight is measured seconds, not steps
    (the MMoE runs take 200 steps and ~170 s, the OLMoE run 400 steps and ~130 s)."""
    for family in ("mmoe", "moemoe", "hf_moe"):
        for recipe in factory.family_recipes(family):
            assert recipe.build_seconds, f"{recipe.source}: no build_seconds"


# The MMoE demo runs' model sections as the recipes wrote them before they became JSON data (numbers
# must not change: the same sizes, hence the same initialisation and training).
BEFORE_JSON = {
    "default": dict(encoder="tiny-64", image_dim=32, text_hidden=32, image_hidden=32, cross_hidden=32, expert_mult=2),
    "tiny": dict(encoder="tiny-32", image_dim=16, text_hidden=16, image_hidden=16, cross_hidden=16, expert_mult=1),
}


@pytest.mark.parametrize("scale", ["default", "tiny"])
def test_mmoe_recipes_give_the_model_configs_they_gave_before(scale):
    recipes = factory.family_recipes("mmoe")
    assert [r.run for r in recipes] == ["mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate"]
    for recipe in recipes:
        options = factory.train_options(recipe, scale, "/data", "/out")
        named, rest = factory.split_model_options("mmoe", options.family_options)
        assert rest == {"per_name": 4}
        before = dict(BEFORE_JSON[scale])
        expected = MMoEConfig(encoder=EncoderSpec(name=before.pop("encoder")).to_dict(), **before)
        expected.gate, expected.num_experts, expected.top_k = options.gate, options.experts, options.top_k
        assert config_from_options(named, options.gate, options.experts, options.top_k) == expected


def test_train_cli_lists_model_configs_and_checks_the_family(capsys):
    from mmoe_core import train

    assert train.main(["--list-model-configs"]) == 0
    assert "mmoe-tiny-32  (mmoe)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        train.main(["--family", "mmoe", "--model-config", "moemoe-d16", "--data", "x", "--out", "y"])
    assert stop.value.code == 2 and "is a 'moemoe' config, not 'mmoe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--family", "nope", "--data", "x", "--out", "y"])  # choices come from the registry
    assert "invalid choice: 'nope'" in capsys.readouterr().err
