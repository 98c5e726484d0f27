"""Hugging Face MoE family: the routing recorded is the one each model's own gate chose, knockout
re-makes the choice, folders round-trip through save_pretrained and the registry.

Tiny random configs of the real transformers classes, built offline (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmoe_core.adapter import load_adapter  # noqa: E402
from mmoe_core.families.hf_moe import HFMoEAdapter, recognises  # noqa: E402
from mmoe_core.families.hf_moe.build import build_vl_processor, build_word_tokenizer, text_moe_config, vl_moe_config  # noqa: E402
from mmoe_core.families.hf_moe.routing import GATES, TESTED  # noqa: E402
from mmoe_core.registry import family_for_checkpoint  # noqa: E402
from mmoe_core.routing_record import flatten_call  # noqa: E402
from mmoe_core.spec import ModelSpec  # noqa: E402

TEXTS = [
    "the red bag is made of leather .",
    "12 + 7 = 19 . 19 - 4 = 15 .",
    "for i in range ( 4 ) : x = x + i",
    "Polaris is a British metal band formed in the 1960s .",
    "what colour is the mug ? answer : blue",
]
TEXT_ARCHS = ("mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v3")
SIZES = dict(hidden=32, layers=2, heads=4, experts=12, top_k=3, expert_hidden=16)


def _examples(n: int = 4) -> list[dict]:
    return [
        {"index": i, "id": f"e{i}", "text": TEXTS[i % len(TEXTS)], "labels": {"domain": f"d{i % 2}"}} for i in range(n)
    ]


def _special(tok) -> dict:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    tok = build_word_tokenizer(TEXTS)
    out = {}
    for arch in TEXT_ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(text_moe_config(arch, len(tok), special_ids=_special(tok), **SIZES))
        if arch == "deepseek_v3":  # a score-correction bias that really moves the choice
            for module in model.modules():
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.data = torch.linspace(-0.3, 0.3, SIZES["experts"])
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    tok = build_word_tokenizer(TEXTS + ["question answer"], vision=True)
    processor = build_vl_processor(tok, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(vl_moe_config(tok, image_size=32, patch_size=8, **SIZES))
    path = tmp_path_factory.mktemp("qwen3_vl_moe")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (40, 32), colour).save(path / f"pic{i}.png")
    return path


def _vl_examples(path: Path) -> list[dict]:
    return [
        {
            "index": 0,
            "id": "q0",
            "text": TEXTS[0],
            "question": "what colour is the bag ?",
            "answer": "red",
            "image_path": str(path / "pic0.png"),
            "labels": {"answer_source": "image"},
        },
        {
            "index": 1,
            "id": "q1",
            "text": TEXTS[4],
            "question": "what is it made of ?",
            "answer": "leather",
            "image_path": str(path / "pic1.png"),
            "labels": {"answer_source": "context"},
        },
        {
            "index": 2,
            "id": "q2",
            "text": TEXTS[2],
            "question": "which loop ?",
            "answer": "for",
            "labels": {"answer_source": "context"},
        },
    ]


def _gate_outputs(adapter: HFMoEAdapter):
    """Hooks of the test's own on every gate module: what each forward really returned."""
    seen: dict[str, list] = {}
    hooks = [
        h.module.register_forward_hook(
            lambda m, a, o, name=h.name: seen.setdefault(name, []).append((o[1].detach().float(), o[2].detach()))
        )
        for h in adapter.handles
    ]
    return seen, hooks


def _assert_recorded_equals_gate(recorder, seen: dict) -> None:
    for layer, calls in recorder.by_layer().items():
        weights, ids = seen[layer][-1]  # the last forward through each gate is the recorded one
        router = calls[-1].router
        b, length, k = router.topk_ids.shape
        assert torch.equal(router.topk_ids.reshape(b * length, k), ids.cpu()), layer
        chosen = router.combine.reshape(b * length, -1).gather(1, ids.cpu().long())
        torch.testing.assert_close(chosen, weights.cpu(), rtol=0, atol=1e-6)
        # combine holds nothing outside the chosen experts
        assert torch.allclose(router.combine.reshape(b * length, -1).sum(-1), weights.sum(-1).cpu(), atol=1e-5)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_routing_is_the_gates_own(text_dirs, arch):
    assert recognises(text_dirs[arch]) and family_for_checkpoint(text_dirs[arch]).name == "hf_moe"
    adapter = load_adapter(text_dirs[arch], device="cpu")
    assert isinstance(adapter, HFMoEAdapter) and adapter.prediction_spec().kind == "lm_loss"
    assert {type(h.module).__name__ for h in adapter.handles} <= set(TESTED)
    seen, hooks = _gate_outputs(adapter)
    try:
        out = adapter.run(_examples(), batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    _assert_recorded_equals_gate(out.recorder, seen)
    rows = flatten_call(out.recorder.calls[0])
    assert set(rows["position_kind"]) == {"text_token"} and set(rows["routed_modality"]) == {"text"}
    lengths = [len(adapter.tokenizer(t)["input_ids"]) + 1 for t in TEXTS[:4]]  # + BOS; left padding dropped
    assert len(rows["position"]) == sum(lengths)
    p = out.predictions[0]
    assert p["loss"] > 0 and len(p["next_tokens"]) == 5 and len(p["token_losses"]) == lengths[0] - 1
    summary = adapter.summarize(out.predictions, _examples())
    assert summary["overall"]["perplexity"] == pytest.approx(torch.tensor(summary["overall"]["loss"]).exp().item())
    assert set(summary["by_domain"]) == {"d0", "d1"}
    spec = adapter.spec()
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    gate = spec.routed_layers[0].gate
    if arch == "deepseek_v3":
        assert (gate.score, gate.normalisation, gate.shared_experts, gate.score_correction_bias) == (
            "sigmoid",
            "topk_scaled",
            1,
            True,
        ) and gate.group_limited == "4 groups, top-2 groups"
        # the weights carry routed_scaling_factor (2.5) over renormalised sigmoid scores
        combine = out.recorder.calls[0].router.combine.reshape(-1, SIZES["experts"])
        valid = combine.sum(-1) > 0
        assert torch.allclose(combine[valid].sum(-1), torch.full((int(valid.sum()),), 2.5), atol=1e-4)
    elif arch == "olmoe":
        assert (gate.score, gate.normalisation) == ("softmax", "topk_raw")
    elif arch == "qwen2_moe":  # a shared expert beside the routed ones, declared (not in the E columns)
        assert (gate.score, gate.normalisation, gate.shared_experts) == ("softmax", "topk_renormalised", 1)
    else:
        assert (gate.score, gate.normalisation) == ("softmax", "topk_renormalised")


def test_deepseek_choice_follows_bias_and_groups(text_dirs):
    """Sigmoid top-k of the logits alone would choose differently: the record keeps the gate's choice."""
    adapter = load_adapter(text_dirs["deepseek_v3"], device="cpu")
    out = adapter.run(_examples(), batch_size=4)
    router = out.recorder.calls[0].router
    e, k = SIZES["experts"], SIZES["top_k"]
    naive = torch.sigmoid(router.logits.reshape(-1, e)).topk(k, -1).indices.sort(-1).values
    chosen = router.topk_ids.reshape(-1, k).sort(-1).values
    assert not torch.equal(naive, chosen)
    groups = chosen // (e // 4)  # every chosen expert lies in at most topk_group = 2 groups
    assert all(len(set(row.tolist())) <= 2 for row in groups)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_knockout_remakes_the_choice(text_dirs, arch):
    adapter = load_adapter(text_dirs[arch], device="cpu")
    examples = _examples()
    before = adapter.run(examples, batch_size=4)
    layer = adapter.routed_layers()[0].name
    ids = before.recorder.by_layer()[layer][0].router.topk_ids
    expert = int(torch.mode(ids.reshape(-1)).values)  # the busiest expert of the first layer
    with adapter.knockout(layer, expert):
        after = adapter.run(examples, batch_size=4)
    new_ids = after.recorder.by_layer()[layer][0].router.topk_ids
    valid = after.recorder.by_layer()[layer][0].meta.valid
    assert not (new_ids[valid] == expert).any()
    assert any(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(before.predictions, after.predictions))
    again = adapter.run(examples, batch_size=4)  # restored after the block
    assert torch.equal(again.recorder.calls[0].router.topk_ids, before.recorder.calls[0].router.topk_ids)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_ablate_layer_removes_the_moe_output(text_dirs, arch):
    """The whole routed layer removed: the MoE block's output is zero (the block's own output read by a
    hook of the test), the routing is still recorded, the loss changes, and all is restored after."""
    adapter = load_adapter(text_dirs[arch], device="cpu")
    examples = _examples()
    layer = adapter.routed_layers()[0].name
    block = adapter.routed_modules()[layer].block
    outputs = []
    hook = block.register_forward_hook(lambda m, a, o: outputs.append(o))  # runs before the ablation hook
    before = adapter.run(examples, batch_size=4)
    hook.remove()
    seen = []
    with adapter.ablate_layer(layer):
        probe = block.register_forward_hook(lambda m, a, o: seen.append(o))  # after: sees the ablated output
        after = adapter.run(examples, batch_size=4)
        probe.remove()
    assert outputs and outputs[0].abs().sum() > 0
    assert seen and all(float(o.abs().sum()) == 0.0 for o in seen)
    assert layer in after.recorder.by_layer()  # the gate still ran and was recorded
    assert any(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(before.predictions, after.predictions))
    again = adapter.run(examples, batch_size=4)
    assert [p["loss"] for p in again.predictions] == pytest.approx([p["loss"] for p in before.predictions])


def test_text_attribution_forward(text_dirs):
    adapter = load_adapter(text_dirs["qwen3_moe"], device="cpu")
    example = _examples(1)[0]
    inputs = adapter.attribution_inputs(example)
    assert list(inputs) == ["tokens"] and inputs["tokens"].shape[1] == len(adapter.input_labels(example)["tokens"])
    f = adapter.attribution_forward(example, "next_token_logit")
    values = f(inputs["tokens"].repeat(3, 1, 1))
    assert values.shape == (3,) and torch.allclose(values, values[0].expand(3))
    recorded = adapter.run([example], batch_size=1).recorder.calls[1].router
    g = adapter.attribution_forward(example, "router_logit", layer="layers.1", expert=2, position=3)
    x = inputs["tokens"].clone().requires_grad_()
    value = g(x)
    torch.testing.assert_close(value.detach(), recorded.logits[:, 3, 2], rtol=1e-4, atol=1e-5)
    value.sum().backward()
    assert x.grad.abs().sum() > 0


def test_vision_language_routing_modality_and_knockout(vl_dir):
    adapter = load_adapter(vl_dir, device="cpu")
    assert adapter.vision and adapter.prediction_spec().kind == "answer"
    examples = _vl_examples(vl_dir)
    seen, hooks = _gate_outputs(adapter)
    try:
        out = adapter.run(examples, batch_size=3)
    finally:
        for h in hooks:
            h.remove()
    _assert_recorded_equals_gate(out.recorder, seen)
    rows = flatten_call(out.recorder.calls[0])
    for example in examples[:2]:  # one placeholder token per merged 2x2 patch cell, with its cell
        grid = adapter.input_grids(example)["image"]
        cells = [
            (r, c)
            for r, c, k, e in zip(rows["grid_row"], rows["grid_col"], rows["position_kind"], rows["example_index"])
            if k == "image_patch" and e == example["index"]
        ]
        assert sorted(cells) == [(r, c) for r in range(grid.rows // 2) for c in range(grid.cols // 2)]
    kinds_of_2 = {k for k, e in zip(rows["position_kind"], rows["example_index"]) if e == 2}
    assert kinds_of_2 <= {"text_token", "decoder_step"}  # no picture, no image positions
    assert {m for m, k in zip(rows["routed_modality"], rows["position_kind"]) if k == "image_patch"} == {"image"}
    assert all(p["gold"] is not None and isinstance(p["prediction"], str) for p in out.predictions)
    summary = adapter.summarize(out.predictions, examples)
    assert set(summary["by_answer_source"]) == {"image", "context"}
    layer = adapter.routed_layers()[0].name
    busiest = int(torch.mode(out.recorder.by_layer()[layer][0].router.topk_ids.reshape(-1)).values)
    with adapter.knockout(layer, busiest):
        after = adapter.run(examples, batch_size=3)
    call = after.recorder.by_layer()[layer][0]
    assert not (call.router.topk_ids[call.meta.valid] == busiest).any()

    def prompt_logits(run):  # the next layer's router logits over the prompt positions
        flat = flatten_call(run.recorder.by_layer()["layers.1"][0])
        keep = [i for i, k in enumerate(flat["position_kind"]) if k != "decoder_step"]
        return torch.as_tensor(flat["logits"][keep])

    assert not torch.allclose(prompt_logits(out), prompt_logits(after))
    spec = adapter.spec()
    assert ModelSpec.from_dict(spec.to_dict()) == spec and [i.name for i in spec.image_inputs()] == ["image"]


def test_vision_language_attributions(vl_dir):
    adapter = load_adapter(vl_dir, device="cpu")
    example = _vl_examples(vl_dir)[0]
    inputs = adapter.attribution_inputs(example)
    grid = adapter.input_grids(example)["image"]
    assert inputs["image"].shape[1] == grid.rows * grid.cols == len(adapter.input_labels(example)["image"])
    f = adapter.attribution_forward(example, "answer_logit")
    tokens, patches = (inputs[k].clone().requires_grad_() for k in ("tokens", "image"))
    value = f(tokens, patches)
    value.sum().backward()
    assert patches.grad.abs().sum() > 0 and tokens.grad.abs().sum() > 0
    two = f(inputs["tokens"].repeat(2, 1, 1), inputs["image"].repeat(2, 1, 1))
    torch.testing.assert_close(two, value.detach().expand(2), rtol=1e-4, atol=1e-5)
    # zeroing the patch embeddings changes the answer logit: the picture reaches the decoder
    assert not torch.allclose(f(inputs["tokens"], torch.zeros_like(inputs["image"])), value.detach())


def test_gate_table_names_real_transformers_classes():
    import importlib

    for arch, cls in (
        ("mixtral", "MixtralTopKRouter"),
        ("olmoe", "OlmoeTopKRouter"),
        ("qwen3_moe", "Qwen3MoeTopKRouter"),
        ("deepseek_v3", "DeepseekV3TopkRouter"),
        ("qwen3_vl_moe", "Qwen3VLMoeTextTopKRouter"),
        ("glm4_moe", "Glm4MoeTopkRouter"),
        ("deepseek_v2", "DeepseekV2TopkRouter"),
    ):
        module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        assert hasattr(module, cls) and cls in GATES


def test_folder_checks(tmp_path, text_dirs):
    from mmoe_core.families.hf_moe.loading import HFCheckpointError, check_folder

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert recognises(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HFCheckpointError, match="pickled weights are never loaded"):
        check_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "family": "mmoe"}))
    assert not recognises(tmp_path)


def test_memory_checked_before_loading(text_dirs, monkeypatch):
    from mmoe_core.errors import ConfigError

    monkeypatch.setenv("MOESCOPE_MAX_MODEL_BYTES", "1000")
    with pytest.raises(ConfigError, match="parameters"):
        load_adapter(text_dirs["mixtral"], device="cpu")
