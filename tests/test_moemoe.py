"""MoEMoE: QGA, alignment losses, expert-only training, checkpoints, routing records, the adapter,
the trainer hooks and the CLIs, all at tiny sizes on the tiny product QA world."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmoe_core.adapter import load_adapter
from mmoe_core.checkpoint import load_state, save_checkpoint
from mmoe_core.factory import family_recipes, get_model_config
from mmoe_core.families.moemoe.adapter import MoEMoEAdapter, qga_agreement
from mmoe_core.families.moemoe.config import DECODER_CALL, default_model_config
from mmoe_core.families.moemoe.data import QAFeaturizer, examples_from_dataset
from mmoe_core.families.moemoe.model import build_model, encode_batch
from mmoe_core.families.moemoe.ops import (
    alignment_loss,
    augment_pictures,
    dominant_source,
    is_expert_or_router,
    qga_weights,
    repeat_to_length,
    stretch_valid_tokens,
    text_copy_targets,
    valid_steps,
)
from mmoe_core.families.moemoe.trainer import loss_parts, picture_questions
from mmoe_core.families.moemoe.vocab import AnswerVocab
from mmoe_core.qa_text import exact_match, normalise_answer

TINY = "moemoe-d16"  # the test sizes: a named model config (model_configs/moemoe-d16.json)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmoe_core.data.generate import generate_qa_world

    return generate_qa_world(tmp_path_factory.mktemp("qa") / "qa", scale="tiny", progress=False)


@pytest.fixture(scope="module")
def examples(world):
    from mmoe_core.data.readers import read_qa_dataset

    dataset = read_qa_dataset(world)
    return {split: examples_from_dataset(items) for split, items in dataset.splits.items()}


@pytest.fixture(scope="module")
def config(examples):
    vocab = AnswerVocab.build(e["answer"] for e in examples["train"])
    return get_model_config(TINY, answer_vocab=vocab.words)


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config)


# ------------------------------------------------------------------------------------ pure functions


def test_normalised_exact_match():
    assert normalise_answer("  Navy   Blue. ") == "navy blue"
    assert exact_match("oeko-tex", "OEKO-TEX") and exact_match("6 months", "6 Months!")
    assert not exact_match("6", "6 months")


def test_answer_vocab_round_trip():
    vocab = AnswerVocab.build(["Extra large", "red", "red", "USB"])
    ids = vocab.encode("extra large", max_words=3)
    assert ids[-1] == vocab.eos_id and vocab.decode(ids) == "extra large"
    assert vocab.decode(vocab.encode("purple", 3)) == "<unk>"


def test_qga_weights_are_a_softmax_over_two_sources():
    alpha, beta = qga_weights(torch.randn(3, 7, 2) * 5)
    assert alpha.shape == beta.shape == (3, 7)
    assert torch.all((alpha >= 0) & (alpha <= 1)) and torch.all((beta >= 0) & (beta <= 1))
    torch.testing.assert_close(alpha + beta, torch.ones(3, 7))
    assert dominant_source([0.9, 0.6], [0.1, 0.4]) == "image"
    assert dominant_source([0.2, 0.6], [0.8, 0.4]) == "context"


def test_alignment_loss_on_hand_built_embeddings():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    assert alignment_loss(a, a.clone() * 3).item() == pytest.approx(0.0, abs=1e-6)  # identical direction
    assert alignment_loss(a, torch.tensor([[0.0, 2.0, 0.0]])).item() == pytest.approx(1.0)  # orthogonal
    assert alignment_loss(a, -a).item() == pytest.approx(2.0)  # opposite


def test_augmented_pictures_are_turned_or_mirrored_copies():
    pixels = torch.randn(6, 3, 8, 8)
    turned = augment_pictures(pixels, np.random.default_rng(0))
    assert turned.shape == pixels.shape
    for before, after in zip(pixels, turned):
        variants = [torch.rot90(before, k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        assert any(torch.equal(after, v) for v in variants)
    assert not torch.equal(turned, pixels)  # seed 0 turns at least one of six
    assert torch.equal(augment_pictures(pixels, np.random.default_rng(0)), turned)  # the rng decides


def test_picture_questions_by_answer_source():
    examples = [{"labels": {"answer_source": s}} for s in ("image", "context", "both", "context")]
    assert picture_questions(examples, [[0, 1], [2, 3]]) == [[0], [2]]
    unlabelled = [{"labels": {"answer_source": "unknown"}} for _ in range(3)]
    assert picture_questions(unlabelled, [[0, 1], [2]]) == [[0, 1], [2]]


def test_resizing_keeps_items_intact():
    x = torch.arange(2 * 3).float().view(2, 3, 1)
    repeated = repeat_to_length(x, 7)
    assert repeated.shape == (2, 7, 1)
    assert set(repeated[0, :, 0].tolist()) == {0.0, 1.0, 2.0}  # every item survives, none is blended
    assert repeated[0, :, 0].tolist() == sorted(repeated[0, :, 0].tolist())
    assert repeat_to_length(torch.ones(1, 8, 2), 4).shape == (1, 4, 2)  # shrinking averages
    stretched = stretch_valid_tokens(
        torch.tensor([[1.0, 2.0, 9.0, 9.0], [5.0, 6.0, 7.0, 9.0]]), torch.tensor([2, 3]), 6
    )
    assert stretched.tolist() == [[1, 1, 1, 2, 2, 2], [5, 5, 6, 6, 7, 7]]  # padding never used


def test_valid_steps_stop_after_eos():
    ids = torch.tensor([[7, 2, 2], [7, 8, 9]])
    assert valid_steps(ids, eos_id=2).tolist() == [[True, True, False], [True, True, True]]


# ---------------------------------------------------------------------------------------- the model


def test_qga_shapes_range_and_factorised_memory(config, examples):
    model = _model(config).eval()
    batch = QAFeaturizer(model).batch(examples["train"][:12])
    assert batch["context_ids"].shape[0] < 12  # a product's sources are encoded once
    with torch.no_grad():
        encoded = encode_batch(model, batch)
    lq = model.question_encoder.context_length
    assert encoded.alpha.shape == encoded.beta.shape == (12, lq)
    assert torch.all((encoded.alpha >= 0) & (encoded.alpha <= 1))
    torch.testing.assert_close(encoded.alpha + encoded.beta, torch.ones_like(encoded.alpha))
    # the decoder projects each source once; that must equal projecting the materialised memory
    linear = model.decoder[0].cross_attn.key
    explicit = linear(torch.cat([encoded.question, encoded.joint()], dim=1))
    torch.testing.assert_close(encoded.project(linear), explicit, atol=1e-5, rtol=1e-5)


def test_copy_targets_put_each_answer_word_on_all_its_pieces(config):
    model = _model(config)
    vocab = AnswerVocab.build(["300 ml", "OEKO-TEX", "purple"])
    text = "It holds 300 ml. Certification: OEKO-TEX. Colour: purple."
    targets = text_copy_targets([text], model.source_encoder, vocab)[0]
    ids = model.source_encoder.tokenize([text])[0]
    pieces = [model.source_encoder.tokenizer.decoder.get(int(t), "") for t in ids]
    by_word = {}
    for piece, target in zip(pieces, targets.tolist()):
        if target != vocab.pad_id:
            by_word.setdefault(vocab.words[target], []).append(piece)
    # CLIP's BPE splits digits and hyphens: the word is spread over its pieces, all of which point to it
    assert by_word["300"] == ["3</w>", "0</w>", "0</w>"]
    assert "".join(by_word["oeko-tex"]).replace("</w>", "").startswith("oeko-tex")
    assert by_word["ml"][0] == "ml</w>" and by_word["purple"][0] == "purple</w>"
    assert targets[0] == vocab.pad_id and (targets[len([p for p in pieces if p]) - 1 :] == vocab.pad_id).all()


def test_copy_pointer_gives_a_distribution_and_can_copy(config, examples):
    model = _model(config).eval()
    batch = QAFeaturizer(model).batch(examples["train"][:6])
    assert batch["copy_ids"].shape == batch["context_ids"].shape
    with torch.no_grad():
        encoded = encode_batch(model, batch)
        log_probs = model.decode(encoded, model.decoder_input_for(batch["answer_ids"]))
        torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]))
        # close the generator: all the mass comes from words written in each question's context
        model.copy_gate.bias.fill_(-50.0)
        copied = model.decode(encoded, model.decoder_input_for(batch["answer_ids"])).exp()
    for row, src in enumerate(batch["source_index"].tolist()):
        in_context = set(batch["copy_ids"][src].tolist()) - {model.vocab.pad_id}
        assert set(torch.nonzero(copied[row, 0] > 1e-6).flatten().tolist()) <= in_context


def test_decoder_layers_alternate_dense_and_moe(config):
    model = _model(config)
    assert [layer.is_moe for layer in model.decoder] == [False, True, False, True]
    assert [m.name for m in model.moe_layers()] == ["decoder.1.moe", "decoder.3.moe"]
    assert model.get_submodule("decoder.1.moe") is model.moe_layers()[0]


def test_loss_parts(config, examples):
    model = _model(config)
    batch = QAFeaturizer(model).batch(examples["train"][:10])
    parts = loss_parts(model, batch)
    assert set(parts) == {"ce", "qca", "qia", "aux"}
    assert all(torch.isfinite(v) for v in parts.values())
    assert 0 <= parts["qca"].item() <= 2 and 0 <= parts["qia"].item() <= 2
    assert parts["aux"].item() == pytest.approx(0.1 * 2, rel=0.6)  # lambda * (two layers, each ~1 balanced)


@pytest.mark.parametrize("fixed_sources", [True, False])
def test_alignment_reaches_the_source_encoders_only_when_asked(config, examples, fixed_sources):
    model = _model({**config, "model": {**config["model"], "align_to_fixed_sources": fixed_sources}})
    batch = QAFeaturizer(model).batch(examples["train"][:10])
    encoded = encode_batch(model, batch)
    (encoded.qca_loss + encoded.qia_loss).backward()
    source_grads = [p.grad for p in model.source_encoder.parameters() if p.requires_grad]
    reached = any(g is not None and g.abs().sum() > 0 for g in source_grads)
    assert reached is not fixed_sources
    question_grads = [p.grad for p in model.question_encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in question_grads)  # the question is pulled either way


def test_expert_only_freezes_the_backbone(config, examples):
    model = _model(config)
    model.set_expert_only(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = QAFeaturizer(model).batch(examples["train"][:16])
    sum(loss_parts(model, batch).values()).backward()
    optimizer.step()
    trained = {n for n in before if is_expert_or_router(n)}
    assert trained and any(".gate.w_gate." in n for n in trained)
    for name, parameter in model.named_parameters():
        if name in trained:
            assert not torch.equal(parameter, before[name]), f"{name} did not train"
        else:
            assert torch.equal(parameter, before[name]), f"backbone parameter {name} changed"
    model.set_expert_only(False)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("logit_scale"))


# ------------------------------------------------------------------------------ adapter + checkpoint


@pytest.fixture(scope="module")
def saved(config, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "moemoe"
    model = _model(config, seed=3)
    save_checkpoint(model, config, ckpt)
    return ckpt, model


def test_save_load_round_trip_is_bit_exact(saved, examples):
    ckpt, model = saved
    adapter = load_adapter(ckpt, device="cpu")
    assert isinstance(adapter, MoEMoEAdapter)
    reference = model.state_dict()
    for name, tensor in adapter.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert load_state(ckpt).keys() == reference.keys()
    test = examples["test"][:20]
    fresh = MoEMoEAdapter(model, adapter.config, "cpu")
    a, b = adapter.run(test, record=False), fresh.run(test, record=False)
    assert [p["prediction"] for p in a.predictions] == [p["prediction"] for p in b.predictions]
    assert [p["score"] for p in a.predictions] == [p["score"] for p in b.predictions]


def test_run_records_decoder_steps_and_qga(saved, examples):
    adapter = load_adapter(saved[0], device="cpu")
    test = examples["test"][:9]
    out = adapter.run(test, record=True, batch_size=4)
    assert len(out.predictions) == 9 and out.representations.shape[0] == 9
    layers = {c.layer for c in out.recorder.calls}
    assert layers == {"decoder.1.moe", "decoder.3.moe"} == {s.name for s in adapter.routed_layers()}
    for call in out.recorder.calls:
        assert call.meta.call == DECODER_CALL and set(call.meta.kinds) == {"decoder_step"}
        assert call.meta.valid[:, 0].all()  # step 0 is always a real step
    indices = sorted({i for c in out.recorder.calls for i in c.meta.example_ids})
    assert indices == sorted(e["index"] for e in test)
    for row, example in zip(out.extras["qga"], test):
        assert row["index"] == example["index"]
        assert len(row["tokens"]) == len(row["alpha"]) == len(row["beta"]) >= 3
        assert row["tokens"][0] == "<start_of_text>" and row["tokens"][-1] == "<end_of_text>"
        assert np.allclose(np.add(row["alpha"], row["beta"]), 1.0)
    for p, example in zip(out.predictions, test):
        assert p["gold"] == example["answer"] and p["correct"] == exact_match(p["prediction"], example["answer"])
    summary = adapter.summarize(out.predictions, test)
    assert summary["overall"]["n"] == 9


def test_summarize_hand_made_predictions():
    examples = [
        {
            "index": 0,
            "answer": "Red",
            "labels": {"question_type": "colour", "answer_source": "image", "category": "mug"},
        },
        {
            "index": 1,
            "answer": "Norvik",
            "labels": {"question_type": "brand", "answer_source": "context", "category": "mug"},
        },
        {
            "index": 2,
            "answer": "6 months",
            "labels": {"question_type": "warranty", "answer_source": "context", "category": "hat"},
        },
        {
            "index": 3,
            "answer": "blue",
            "labels": {"question_type": "colour", "answer_source": "both", "category": "hat"},
        },
    ]
    predictions = [
        {"index": 0, "prediction": "red"},
        {"index": 1, "prediction": "norvik"},
        {"index": 2, "prediction": "6"},
        {"index": 3, "prediction": "green"},
    ]
    summary = MoEMoEAdapter.summarize(None, predictions, examples)
    assert summary["overall"] == {"exact_match": 0.5, "n": 4}
    assert summary["by_question_type"]["colour"] == {"exact_match": 0.5, "n": 2}
    assert summary["by_question_type"]["brand"]["exact_match"] == 1.0
    assert summary["by_answer_source"]["context"] == {"exact_match": 0.5, "n": 2}
    assert summary["by_answer_source"]["both"]["exact_match"] == 0.0
    assert summary["by_category"]["mug"]["exact_match"] == 1.0
    qga = [
        {"index": 0, "alpha": [0.9, 0.8], "beta": [0.1, 0.2]},
        {"index": 1, "alpha": [0.7], "beta": [0.3]},
        {"index": 2, "alpha": [0.1], "beta": [0.9]},
        {"index": 3, "alpha": [0.1], "beta": [0.9]},
    ]
    agreement = qga_agreement(qga, examples)
    assert agreement["n"] == 3 and agreement["agreement"] == pytest.approx(2 / 3)


def test_declarations_and_attribution(saved, examples):
    adapter = load_adapter(saved[0], device="cpu")
    assert [s.name for s in adapter.input_spec()] == ["question", "context", "image"]
    assert adapter.prediction_spec().kind == "answer"
    assert {t.name for t in adapter.attribution_targets()} == {"answer_logit", "router_logit"}
    assert [o.name for o in adapter.output_spec()] == ["qga"]
    assert adapter.spec().output("source_weights")[0].truth_label == "answer_source"
    assert adapter.slice_labels() == ["question_type", "answer_source", "category"]
    example = examples["test"][0]
    inputs = adapter.attribution_inputs(example)
    labels = adapter.input_labels(example)
    for name, tensor in inputs.items():
        assert tensor.shape[0] == 1 and tensor.shape[1] == len(labels[name])
    doubled = [torch.cat([t, t * 0.5]).requires_grad_(True) for t in inputs.values()]
    for fn in (
        adapter.attribution_forward(example, "answer_logit"),
        adapter.attribution_forward(example, "router_logit", layer="decoder.1.moe", expert=2, position=0),
    ):
        out = fn(*doubled)
        assert out.shape == (2,)
        grads = torch.autograd.grad(out.sum(), doubled, allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError):
        adapter.attribution_forward(example, "router_logit", layer="decoder.1.moe", expert=0, position=99)


def test_knockout_removes_an_expert(saved, examples):
    adapter = load_adapter(saved[0], device="cpu")
    with adapter.knockout("decoder.3.moe", 1):
        out = adapter.run(examples["test"][:6])
    chosen = {int(e) for c in out.recorder.calls if c.layer == "decoder.3.moe" for e in c.router.topk_ids.flatten()}
    assert 1 not in chosen


# -------------------------------------------------------------------------- trainer, CLIs and demo


def test_train_cli_phases_and_evaluate_cli(world, tmp_path, capsys):
    from mmoe_core import evaluate, train

    out = tmp_path / "run"
    opts = ["--model-config", TINY]
    assert (
        train.main(
            [
                "--family",
                "moemoe",
                "--data",
                str(world),
                "--out",
                str(out),
                "--steps",
                "6",
                "--batch-size",
                "20",
                "--lr",
                "3e-3",
                "--top-k",
                "2",
                "--snapshot-every",
                "3",
                "--no-progress",
                "--opt",
                "expert_only_after_steps=3",
                *opts,
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "moemoe" and config["model"]["aux_weight"] == 0.1
    assert config["model"]["answer_vocab"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_3.safetensors", "step_6.safetensors"]
    # the expert-only phase changed experts/routers only
    early, final = load_state(out, snapshot=3), load_state(out)
    changed = {k for k in final if not torch.equal(early[k], final[k])}
    assert changed and all(is_expert_or_router(k) for k in changed)
    capsys.readouterr()
    assert evaluate.main([str(out), "--data", str(world), "--json", "--no-progress", "--limit", "30"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["family"] == "moemoe" and result["overall"]["n"] == 30
    assert {"by_question_type", "by_answer_source"} <= set(result)
    assert math.isfinite(result["overall"]["exact_match"])


def test_image_warmup_trains_the_tower_first_then_freezes_it(world, tmp_path, capsys):
    from mmoe_core import train

    out = tmp_path / "warm"
    opts = ["--model-config", TINY]
    assert (
        train.main(
            [
                "--family",
                "moemoe",
                "--data",
                str(world),
                "--out",
                str(out),
                "--steps",
                "5",
                "--batch-size",
                "20",
                "--lr",
                "3e-3",
                "--top-k",
                "2",
                "--snapshot-every",
                "1",
                "--no-progress",
                "--opt",
                "image_warmup_steps=2",
                "--opt",
                "image_warmup_products=4",
                *opts,
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["image_warmup_steps"] == 2
    states = {step: load_state(out, snapshot=step) for step in (1, 2, 3, 5)}
    final = load_state(out)
    assert not any(k.startswith("image_reading_head") for k in final)  # training-only head

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    tower = lambda k: k.startswith("source_encoder.clip.visual.")  # noqa: E731
    warmup_step = changed(states[1], states[2])
    assert any(tower(k) for k in warmup_step)
    assert not any(k.startswith(("decoder.", "answer_head.", "qga.")) for k in warmup_step)
    qa_steps = changed(states[3], states[5])
    assert any(k.startswith("decoder.") for k in qa_steps)
    assert not any(tower(k) for k in qa_steps)  # frozen after the warm-up
    import pandas as pd

    log = pd.read_parquet(out / "train_log.parquet").set_index("step")
    assert np.isfinite(log.loc[1, "loss.image_reading"]) and np.isfinite(log.loc[5, "loss.ce"])
    capsys.readouterr()
    assert (
        train.main(
            [
                "--family",
                "moemoe",
                "--data",
                str(world),
                "--out",
                str(tmp_path / "bad"),
                "--steps",
                "4",
                "--no-progress",
                "--opt",
                "image_warmup_steps=3",
                "--opt",
                "expert_only_after_steps=2",
                *opts,
            ]
        )
        == 2
    )
    assert "freezes it before the warm-up ends" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_the_named_configs_are_the_schema_defaults():
    assert get_model_config("moemoe-d64")["model"] == default_model_config()
    tiny = get_model_config(TINY)["model"]
    assert set(tiny) == set(default_model_config()) and tiny["model_dim"] < default_model_config()["model_dim"]


def test_demo_recipe_resolves_at_both_scales():
    recipe = next(r for r in family_recipes("moemoe") if r.run == "moemoe-qa")
    assert recipe.run == "moemoe-qa" and recipe.world == "qa"
    default, tiny = recipe.resolved("default"), recipe.resolved("tiny")
    assert default["family_options"]["expert_only_after_steps"] < default["steps"]
    assert default["family_options"]["aux_weight"] == 0.1 and tiny["steps"] < 30
    assert tiny["family_options"]["expert_only_after_steps"] < tiny["steps"]
    for options in (default, tiny):  # warm-up, then QA steps with QGA free, then expert-only
        family = options["family_options"]
        assert 0 < family["image_warmup_steps"] < family["qga_warmup_steps"] < family["expert_only_after_steps"]
