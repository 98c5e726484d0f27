"""Checkpoint configs are untrusted: every size is type- and range-checked by its family, and the model's
parameters and memory are counted (on the meta device) before any tensor is allocated; an absurd config is
refused with the numbers, through the same loading path the app uses (``load_adapter``). Unit tier."""

from __future__ import annotations

import copy
import json
import math
import resource
import shutil
import time

import pytest
from safetensors.torch import load_file, save_file

from mmoe_core.adapter import load_adapter
from mmoe_core.errors import ConfigError, UserError
from mmoe_core.limits import MAX_BYTES_ENV, meta_footprint
from tests.reliability_helpers import SMALL_MMOE, rewrite_config, small_mmoe_checkpoint


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return small_mmoe_checkpoint(tmp_path_factory.mktemp("ckpt") / "good")


def variant(good, tmp_path, change) -> object:
    return rewrite_config(shutil.copytree(good, tmp_path / "variant"), change)


def refused(ckpt, *words) -> str:
    """load_adapter refuses ``ckpt`` fast, with little memory, naming ``words``; returns the message."""
    rss, started = peak_rss_mb(), time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_adapter(ckpt, device="cpu")
    message = str(caught.value)
    assert time.perf_counter() - started < 30, "the refusal must come before any real build"
    assert peak_rss_mb() - rss < 200, f"memory grew by {peak_rss_mb() - rss:.0f} MB before the refusal"
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    print(message)  # the numbers, for RELIABILITY.md (pytest -s)
    return message


@pytest.mark.parametrize(
    "value, words",
    [
        (1_000_000_000, ["cross_hidden = 1000000000", "out of range", "16,384"]),
        (-3, ["cross_hidden = -3", "out of range"]),
        ("32", ["cross_hidden = '32'", "must be an integer, not str"]),
        (32.5, ["must be an integer"]),
        (True, ["must be an integer, not bool"]),
        (None, ["must be a number, not null"]),
    ],
)
def test_every_size_is_type_and_range_checked(value, words, good, tmp_path):
    ckpt = variant(good, tmp_path, lambda c: c["model"].update(cross_hidden=value))
    message = refused(ckpt, *words)
    assert str(ckpt / "config.json") in message


def test_a_huge_encoder_extra_width_is_refused(good, tmp_path):
    refused(
        variant(good, tmp_path, lambda c: c["model"]["encoder"]["extra"].update(text_width=10**9)),
        "model.encoder.extra: text_width = 1000000000",
        "out of range",
    )


def test_sizes_within_range_but_too_big_together_are_refused_with_the_estimate(good, tmp_path):
    """Each size allowed, together 137 billion parameters: counted on the meta device, refused with the numbers."""
    ckpt = variant(good, tmp_path, lambda c: c["model"].update(cross_hidden=16384, expert_mult=64.0))
    message = refused(ckpt, "parameters", "to load it needs about", "more than")
    params = int(message.split(" parameters")[0].split()[-1].replace(",", ""))
    assert params > 10**11


def test_the_estimate_is_the_real_parameter_count_and_a_budget_refuses_it(good, tmp_path, monkeypatch):
    from mmoe_core.registry import build_model

    config = copy.deepcopy(SMALL_MMOE)
    real = sum(p.numel() for p in build_model(config).parameters())
    _, footprint = meta_footprint(lambda: build_model(config))
    assert footprint.parameters == real
    monkeypatch.setenv(MAX_BYTES_ENV, str(footprint.bytes))  # loading needs model + file: 2x, so over budget
    message = refused(good, f"{real:,} parameters", f"${MAX_BYTES_ENV}")
    assert "config.json" in message
    monkeypatch.setenv(MAX_BYTES_ENV, str(footprint.bytes * 2))
    assert load_adapter(good, device="cpu").family == "mmoe"  # just enough


def test_moemoe_configs_are_checked_too(tmp_path):
    from mmoe_core.families.moemoe.config import default_config
    from mmoe_core.registry import check_config

    base = default_config()
    for change, words in (
        ({"decoder_layers": 10**6}, ["decoder_layers = 1000000"]),
        ({"model_dim": 100, "decoder_heads": 3}, ["not a multiple of decoder_heads"]),
        ({"answer_vocab": "yes no"}, ["answer_vocab must be a list"]),
        ({"model_dim": 16384, "decoder_layers": 256, "ffn_mult": 64.0}, ["parameters", "to load it needs about"]),
    ):
        config = copy.deepcopy(base)
        config["model"].update(change)
        with pytest.raises(ConfigError) as caught:
            check_config(config, "moemoe/config.json")
        assert all(w in str(caught.value) for w in words), str(caught.value)
    missing = copy.deepcopy(base)
    del missing["model"]["source_encoder"]
    with pytest.raises(ConfigError, match="missing"):
        check_config(missing, "moemoe/config.json")


# ------------------------------------------------------------------------------ Hugging Face folders


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from mmoe_core.families.hf_moe.build import build_word_tokenizer, text_moe_config

    tokenizer = build_word_tokenizer(["a tiny corpus of words for a tiny model"] * 2)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    folder = tmp_path_factory.mktemp("hf") / "mixtral"
    model = AutoModelForCausalLM.from_config(text_moe_config("mixtral", len(tokenizer), special_ids=ids))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_variant(folder, tmp_path, change=None, weights=None):
    copy_ = shutil.copytree(folder, tmp_path / "hf")
    if change is not None:
        config = json.loads((copy_ / "config.json").read_text())
        change(config)
        (copy_ / "config.json").write_text(json.dumps(config))
    if weights is not None:
        weights(copy_ / "model.safetensors")
    return copy_


def test_hf_config_sizes_are_checked_and_estimated_before_loading(hf_folder, tmp_path, monkeypatch):
    refused(
        hf_variant(hf_folder, tmp_path / "a", lambda c: c.update(hidden_size=10**9)),
        "hidden_size = 1000000000",
        "out of range",
    )
    refused(
        hf_variant(
            hf_folder,
            tmp_path / "b",
            lambda c: c.update(
                num_local_experts=60000, num_hidden_layers=1000, intermediate_size=60000, hidden_size=60000
            ),
        ),
        "rough count",
        "parameters",
        "to load it needs about",
    )
    assert load_adapter(hf_folder, device="cpu").family == "hf_moe"
    monkeypatch.setenv(MAX_BYTES_ENV, "100000")
    refused(hf_folder, "parameters", f"${MAX_BYTES_ENV}")


def test_hf_weights_that_disagree_are_truncated_or_hold_nan_are_refused(hf_folder, tmp_path):
    def cut(path):
        path.write_bytes(path.read_bytes()[:2000])

    def nan(path):
        state = {k: v.clone() for k, v in load_file(str(path)).items()}
        next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = math.nan
        save_file(state, str(path), metadata={"format": "pt"})

    cases = (
        (hf_variant(hf_folder, tmp_path / "c", lambda c: c.update(intermediate_size=96)), "do not fit"),
        (hf_variant(hf_folder, tmp_path / "d", weights=cut), "truncated"),
        (hf_variant(hf_folder, tmp_path / "e", weights=nan), "NaN or Inf"),
    )
    for folder, words in cases:
        with pytest.raises(UserError, match=words):
            load_adapter(folder, device="cpu")


def test_training_refuses_an_absurd_model_before_building_it(tmp_path):
    from mmoe_core.training import TrainOptions, train

    class Trainer:
        family = "mmoe"

        def model_config(self):
            return {**SMALL_MMOE["model"], "cross_hidden": 16384, "expert_mult": 64.0}

        def build_model(self, config):
            raise AssertionError("never built")

    options = TrainOptions(family="mmoe", steps=1, progress=False)
    with pytest.raises(ConfigError, match="to train it needs about"):
        train(Trainer(), options, tmp_path / "out")
    assert not (tmp_path / "out").exists()
