"""End-to-end tier: the Hugging Face family's two tiny demo runs, trained and precomputed by the demo
build, take the path a user's checkpoint takes (save_pretrained folder -> registry -> precompute)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("transformers")

VL_RUN, LM_RUN = "hf-qwen3vl-qa", "hf-olmoe-corpus"


@pytest.mark.parametrize("run", [VL_RUN, LM_RUN])
def test_demo_checkpoint_is_a_plain_hf_folder(demo_artifacts, run):
    from mmoe_core.families.hf_moe.loading import recognises
    from mmoe_core.registry import family_for_checkpoint

    ckpt = demo_artifacts / "checkpoints" / run
    config = json.loads((ckpt / "config.json").read_text())
    assert "model_type" in config and "family" not in config and (ckpt / "model.safetensors").is_file()
    assert (ckpt / "tokenizer.json").is_file() and recognises(ckpt) and family_for_checkpoint(ckpt).name == "hf_moe"
    assert list((ckpt / "snapshots").glob("step_*.safetensors")) and (ckpt / "train_log.parquet").is_file()


def test_vl_run_artifacts(demo_artifacts):
    run_dir = demo_artifacts / "runs" / VL_RUN
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["family"] == "hf_moe" and manifest["spec"]["prediction"]["kind"] == "answer"
    routing = pd.read_parquet(run_dir / "routing.parquet")
    kinds = set(routing["position_kind"])
    assert {"image_patch", "text_token"} <= kinds
    answered = pd.read_parquet(run_dir / "predictions.parquet")["prediction"].astype(str).str.len().gt(0).any()
    # the tiny run may answer every question with end-of-text at once: then no decoder step is routed
    assert ("decoder_step" in kinds) == bool(answered)
    images = routing[routing["position_kind"] == "image_patch"]
    assert (images["routed_modality"] == "image").all() and (images["grid_row"] >= 0).all()
    assert (routing.loc[routing["position_kind"] != "image_patch", "grid_row"] == -1).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "exact_match" in metrics["overall"] and set(metrics["by_answer_source"]) <= {"image", "context", "both"}
    special = pd.read_parquet(run_dir / "specialisation.parquet")
    assert "answer_source" in set(special["label"])


def test_lm_run_artifacts(demo_artifacts):
    run_dir = demo_artifacts / "runs" / LM_RUN
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["spec"]["prediction"]["kind"] == "lm_loss"
    gate = manifest["spec"]["routed_layers"][0]["gate"]
    assert gate["kind"] == "hf:OlmoeTopKRouter" and gate["normalisation"] == "topk_raw"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["overall"]["loss"] > 0 and set(metrics["by_domain"]) == {"entity", "product", "arithmetic", "code"}
    special = pd.read_parquet(run_dir / "specialisation.parquet")
    assert "domain" in set(special["label"])
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    assert len(predictions) == manifest["num_examples"]
