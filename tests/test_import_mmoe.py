"""Importing checkpoints trained with the published MEL-MMoE code (mmoe_core.families.mmoe.import_mmoe).

The published checkpoint is simulated: a state dict with the published key names and shapes at a
small config (a Hugging Face CLIPModel-shaped encoder with few, narrow layers, plus the matcher), filled
with random tensors. The reference it is compared with is written here, independently, from a reading
of the public code (codes/model/modeling_mmoe.py, codes/model/moe.py of zhiweihu1103/MEL-MMoE) and of
Hugging Face's CLIP forward; it shares no code with mmoe_core.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmoe_core.families.mmoe.import_mmoe import ImportRefused, build_imported, import_checkpoint, main, read_checkpoint

# A small published config (the config/*.yaml ``model:`` names).
TEXT_W, TEXT_LAYERS, TEXT_HEADS, TEXT_POS = 32, 2, 2, 77  # dt = input_hidden_dim = projection width
VIS_W, VIS_LAYERS, VIS_HEADS = 48, 2, 3  # input_image_hidden_dim
IMAGE, PATCH = 32, 8  # 16 patches + CLS = 17 image tokens
TEXT_LEN = (IMAGE // PATCH) ** 2 + 1  # text_max_length must equal it (InterMoE)
DT, DV, TGLU, IDLU, CMFU = TEXT_W, 16, 24, 16, 20
E, K = 4, 3
VOCAB, EOT, SOT = 49408, 49407, 49406
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# A published state dict with random weights
# ---------------------------------------------------------------------------------------------


def _lin(sd, name, out_f, in_f, g, bias=True):
    sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_f, generator=g) * 0.1


def _ln(sd, name, dim, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)


def _hf_layer(sd, p, w, g):
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _lin(sd, f"{p}.self_attn.{proj}", w, w, g)
    _ln(sd, f"{p}.layer_norm1", w, g)
    _ln(sd, f"{p}.layer_norm2", w, g)
    _lin(sd, f"{p}.mlp.fc1", 4 * w, w, g)
    _lin(sd, f"{p}.mlp.fc2", w, 4 * w, g)


def _switch_moe(sd, p, dim, out, g):
    for i in range(E):
        _lin(sd, f"{p}.experts.{i}.ff.0.0", 4 * dim, dim, g)
        _lin(sd, f"{p}.experts.{i}.ff.2", out, 4 * dim, g)
    _lin(sd, f"{p}.gate.w_gate", E, dim, g)


def published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Lightning ``state_dict`` of LightningForMMoE at the small config (transformers 4.27 key set, with the
    persistent position_ids buffers)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    c = "encoder.clip."
    sd[c + "text_model.embeddings.token_embedding.weight"] = 0.5 * torch.randn(VOCAB, TEXT_W, generator=g)
    sd[c + "text_model.embeddings.position_embedding.weight"] = 0.5 * torch.randn(TEXT_POS, TEXT_W, generator=g)
    sd[c + "text_model.embeddings.position_ids"] = torch.arange(TEXT_POS).unsqueeze(0)
    for i in range(TEXT_LAYERS):
        _hf_layer(sd, f"{c}text_model.encoder.layers.{i}", TEXT_W, g)
    _ln(sd, c + "text_model.final_layer_norm", TEXT_W, g)
    n_pos = (IMAGE // PATCH) ** 2 + 1
    sd[c + "vision_model.embeddings.class_embedding"] = 0.5 * torch.randn(VIS_W, generator=g)
    sd[c + "vision_model.embeddings.patch_embedding.weight"] = torch.randn(VIS_W, 3, PATCH, PATCH, generator=g) / PATCH
    sd[c + "vision_model.embeddings.position_embedding.weight"] = 0.5 * torch.randn(n_pos, VIS_W, generator=g)
    sd[c + "vision_model.embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
    _ln(sd, c + "vision_model.pre_layrnorm", VIS_W, g)
    for i in range(VIS_LAYERS):
        _hf_layer(sd, f"{c}vision_model.encoder.layers.{i}", VIS_W, g)
    _ln(sd, c + "vision_model.post_layernorm", VIS_W, g)
    _lin(sd, c + "visual_projection", TEXT_W, VIS_W, g, bias=False)
    _lin(sd, c + "text_projection", TEXT_W, TEXT_W, g, bias=False)
    sd[c + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    _lin(sd, "encoder.image_cls_fc", DV, TEXT_W, g)
    _lin(sd, "encoder.image_tokens_fc", DV, VIS_W, g)
    m = "matcher."
    for unit, dim, hidden, fc_in in (("text_module", DT, TGLU, TGLU), ("vision_module", DV, IDLU, DV)):
        for fc in ("fc_query", "fc_key", "fc_value"):
            _lin(sd, f"{m}{unit}.{fc}", hidden, fc_in, g)
        _ln(sd, f"{m}{unit}.layer_norm", hidden, g)
        _switch_moe(sd, f"{m}{unit}.moe_layer", dim, hidden, g)
    _lin(sd, m + "cross_module.text_fc", CMFU, DT, g)
    _lin(sd, m + "cross_module.image_fc", CMFU, DV, g)
    _lin(sd, m + "cross_module.gate_fc", 1, CMFU, g)
    _ln(sd, m + "cross_module.gate_layer_norm", CMFU, g)
    _ln(sd, m + "cross_module.context_layer_norm", CMFU, g)
    _switch_moe(sd, m + "cross_module.moe_layer", CMFU, CMFU, g)
    for name, dim in (
        ("text_cls_layernorm", DT),
        ("text_tokens_layernorm", DT),
        ("image_cls_layernorm", DV),
        ("image_tokens_layernorm", DV),
    ):
        _ln(sd, m + name, dim, g)
    return sd


HEAD_OPTS = dict(text_heads=TEXT_HEADS, vision_heads=VIS_HEADS)


# ---------------------------------------------------------------------------------------------
# Reference: the published forward, written from the public code (independent of mmoe_core)
# ---------------------------------------------------------------------------------------------


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _layer_norm(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def ref_switch_gate(sd, p, x, top_k):
    """SwitchGate: softmax; capacity = int(1.0 * x.size(0)); top-k mask scattered along dim 1; each
    column divided by its sum over dim 0 (+1e-6) and multiplied by the capacity."""
    scores = torch.softmax(_linear(sd, f"{p}.w_gate", x), dim=-1)
    capacity = int(1.0 * x.size(0))
    _, idx = scores.topk(top_k, dim=-1)
    mask = torch.zeros_like(scores).scatter_(1, idx, 1)
    masked = scores * mask
    return masked / (masked.sum(0, keepdim=True) + 1e-6) * capacity


def ref_switch_moe(sd, p, x, gate_input, top_k):
    gates = ref_switch_gate(sd, f"{p}.gate", gate_input, top_k)
    outs = [_linear(sd, f"{p}.experts.{i}.ff.2", F.gelu(_linear(sd, f"{p}.experts.{i}.ff.0.0", x))) for i in range(E)]
    gates = torch.where(torch.isnan(gates), torch.zeros_like(gates), gates)
    stacked = torch.stack(outs, dim=-1)
    stacked = torch.where(torch.isnan(stacked), torch.zeros_like(stacked), stacked)
    return (gates.unsqueeze(-2) * stacked).sum(-1)


def ref_intra_unit(sd, p, hidden, e_cls, e_tok, m_cls, m_tok, top_k):
    """TextUnit / VisionUnit.forward."""
    e_feat = torch.cat([e_cls.unsqueeze(1), e_tok], dim=1)
    e_moe = ref_switch_moe(sd, f"{p}.moe_layer", e_feat, e_feat, top_k)
    e_cls_fc = e_moe[:, 0, :].unsqueeze(1)
    e_tokens = e_moe[:, 1:, :]
    m_feat = torch.cat([m_cls.unsqueeze(1), m_tok], dim=1)
    m_tokens = ref_switch_moe(sd, f"{p}.moe_layer", m_feat, m_feat, top_k)[:, 1:, :]
    q = _linear(sd, f"{p}.fc_query", e_tokens).unsqueeze(1)
    k = _linear(sd, f"{p}.fc_key", m_tokens).unsqueeze(0)
    v = _linear(sd, f"{p}.fc_value", m_tokens).unsqueeze(0)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden), dim=-1)
    context = _layer_norm(sd, f"{p}.layer_norm", (att @ v).mean(dim=-2))  # [N, B, H]
    g2l = (e_cls_fc * context).sum(-1).transpose(0, 1)
    g2g = m_cls @ e_cls.transpose(-1, -2)
    return (g2l + g2g) / 2


def ref_cross_unit(sd, p, e_tc, e_tt, m_tc, m_tt, e_ic, e_it, m_ic, m_it, top_k):
    """CrossUnit.forward, including its entity/mention asymmetry in the tanh gate's input."""
    e_tc = _linear(sd, f"{p}.text_fc", e_tc)
    e_tc_ori = e_tc
    e_tt = _linear(sd, f"{p}.text_fc", e_tt)
    m_tc = _linear(sd, f"{p}.text_fc", m_tc)
    m_tc_ori = m_tc
    m_tt = _linear(sd, f"{p}.text_fc", m_tt)
    e_ic = _linear(sd, f"{p}.image_fc", e_ic)
    e_ic_ori = e_ic
    e_it = _linear(sd, f"{p}.image_fc", e_it)
    m_ic = _linear(sd, f"{p}.image_fc", m_ic)
    m_ic_ori = m_ic
    m_it = _linear(sd, f"{p}.image_fc", m_it)
    e_tc_it = torch.cat([e_tc.unsqueeze(1), e_it], dim=1)
    e_ic_tt = torch.cat([e_ic.unsqueeze(1), e_tt], dim=1)
    m_tc_it = torch.cat([m_tc.unsqueeze(1), m_it], dim=1)
    m_ic_tt = torch.cat([m_ic.unsqueeze(1), m_tt], dim=1)
    moe = f"{p}.moe_layer"
    out = ref_switch_moe(sd, moe, e_tc_it, e_ic_tt, top_k)
    e_tc, e_it = out[:, 0], out[:, 1:]
    out = ref_switch_moe(sd, moe, m_tc_it, m_ic_tt, top_k)
    m_tc, m_it = out[:, 0], out[:, 1:]
    out = ref_switch_moe(sd, moe, e_ic_tt, e_tc_it, top_k)
    e_ic, e_tt = out[:, 0], out[:, 1:]
    out = ref_switch_moe(sd, moe, m_ic_tt, m_tc_it, top_k)
    m_ic, m_tt = out[:, 0], out[:, 1:]

    def gate(x):
        return torch.tanh(_linear(sd, f"{p}.gate_fc", x))

    def attend(cls, tokens):
        probs = torch.softmax(cls.unsqueeze(1) @ tokens.transpose(-1, -2), dim=-1)
        return (probs @ tokens).squeeze()

    e_ctx = attend(e_tc, e_it)
    e_ctx = _layer_norm(sd, f"{p}.gate_layer_norm", e_tc_ori * gate(e_ctx) + e_ctx)  # entity: gate(context)
    m_ctx = attend(m_tc, m_it)
    m_ctx = _layer_norm(sd, f"{p}.gate_layer_norm", m_tc_ori * gate(m_tc_ori) + m_ctx)  # mention: gate(cls)
    s_ti = m_ctx @ e_ctx.transpose(-1, -2)
    e_ctx2 = attend(e_ic, e_tt)
    e_ctx2 = _layer_norm(sd, f"{p}.gate_layer_norm", e_ic_ori * gate(e_ctx2) + e_ctx2)
    m_ctx2 = attend(m_ic, m_tt)
    m_ctx2 = _layer_norm(sd, f"{p}.gate_layer_norm", m_ic_ori * gate(m_ic_ori) + m_ctx2)
    s_it = m_ctx2 @ e_ctx2.transpose(-1, -2)
    return (s_ti + s_it) / 2


def ref_matcher(sd, ent, men, top_k=K):
    """MMoEMatcher.forward on encoder features; ent / men = (text_cls, text_tokens, image_cls, image_tokens)."""
    m = "matcher."
    e_tc, e_tt, e_ic, e_it = ent
    m_tc, m_tt, m_ic, m_it = men
    e_tc, m_tc = _layer_norm(sd, m + "text_cls_layernorm", e_tc), _layer_norm(sd, m + "text_cls_layernorm", m_tc)
    e_tt, m_tt = _layer_norm(sd, m + "text_tokens_layernorm", e_tt), _layer_norm(sd, m + "text_tokens_layernorm", m_tt)
    e_ic, m_ic = _layer_norm(sd, m + "image_cls_layernorm", e_ic), _layer_norm(sd, m + "image_cls_layernorm", m_ic)
    e_it, m_it = (
        _layer_norm(sd, m + "image_tokens_layernorm", e_it),
        _layer_norm(sd, m + "image_tokens_layernorm", m_it),
    )
    text = ref_intra_unit(sd, m + "text_module", TGLU, e_tc, e_tt, m_tc, m_tt, top_k)
    image = ref_intra_unit(sd, m + "vision_module", IDLU, e_ic, e_it, m_ic, m_it, top_k)
    cross = ref_cross_unit(sd, m + "cross_module", e_tc, e_tt, m_tc, m_tt, e_ic, e_it, m_ic, m_it, top_k)
    return (text + image + cross) / 3, (text, image, cross)


# Reference: Hugging Face CLIPModel forward on HF-layout weights (quick_gelu, causal + padding mask).


def _hf_attention(sd, p, x, heads, mask):
    b, n, w = x.shape
    hd = w // heads

    def split(t):
        return t.view(b, n, heads, hd).transpose(1, 2)

    q = split(_linear(sd, f"{p}.q_proj", x) * hd**-0.5)
    k, v = split(_linear(sd, f"{p}.k_proj", x)), split(_linear(sd, f"{p}.v_proj", x))
    w_ = q @ k.transpose(-1, -2)
    if mask is not None:
        w_ = w_ + mask.unsqueeze(1)
    out = (torch.softmax(w_, dim=-1) @ v).transpose(1, 2).reshape(b, n, w)
    return _linear(sd, f"{p}.out_proj", out)


def _hf_layers(sd, p, x, n_layers, heads, mask):
    for i in range(n_layers):
        q = f"{p}.encoder.layers.{i}"
        x = x + _hf_attention(sd, f"{q}.self_attn", _layer_norm(sd, f"{q}.layer_norm1", x), heads, mask)
        h = _linear(sd, f"{q}.mlp.fc1", _layer_norm(sd, f"{q}.layer_norm2", x))
        x = x + _linear(sd, f"{q}.mlp.fc2", h * torch.sigmoid(1.702 * h))
    return x


def ref_encoder(sd, input_ids, attention_mask, pixels):
    """MMoEEncoder.forward: (text_embeds, image_cls_fc(image_embeds), text_seq_tokens,
    image_tokens_fc(image_patch_tokens)), with CLIPModel's normalised embeds."""
    c = "encoder.clip."
    b, n = input_ids.shape
    x = sd[c + "text_model.embeddings.token_embedding.weight"][input_ids]
    x = x + sd[c + "text_model.embeddings.position_embedding.weight"][:n]
    neg = torch.finfo(x.dtype).min
    causal = torch.full((n, n), neg, dtype=x.dtype).triu(1)
    pad = (1.0 - attention_mask[:, None, :].to(x.dtype)) * neg
    x = _hf_layers(sd, c + "text_model", x, TEXT_LAYERS, TEXT_HEADS, causal.unsqueeze(0) + pad)
    text_tokens = _layer_norm(sd, c + "text_model.final_layer_norm", x)
    pooled = text_tokens[torch.arange(b), input_ids.argmax(dim=-1)]
    text_embeds = F.linear(pooled, sd[c + "text_projection.weight"])
    patches = F.conv2d(pixels, sd[c + "vision_model.embeddings.patch_embedding.weight"], stride=PATCH)
    patches = patches.flatten(2).transpose(1, 2)
    cls = sd[c + "vision_model.embeddings.class_embedding"].expand(b, 1, -1)
    y = torch.cat([cls, patches], dim=1) + sd[c + "vision_model.embeddings.position_embedding.weight"]
    y = _layer_norm(sd, c + "vision_model.pre_layrnorm", y)
    last = _hf_layers(sd, c + "vision_model", y, VIS_LAYERS, VIS_HEADS, None)
    image_embeds = F.linear(
        _layer_norm(sd, c + "vision_model.post_layernorm", last[:, 0]), sd[c + "visual_projection.weight"]
    )
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    return (
        text_embeds,
        text_tokens,
        _linear(sd, "encoder.image_cls_fc", image_embeds),
        _linear(sd, "encoder.image_tokens_fc", last),
    )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def hf_inputs(n: int, lengths: list[int], seed: int):
    """HF-tokenizer-style ids (SOT .. EOT, padded with EOT as the OpenAI CLIP tokenizer does), its
    attention mask, the same ids padded with 0 as MoEscope's tokenizer pads, and random pixels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, TEXT_LEN), EOT)
    for row, length in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1 : length - 1] = torch.randint(1, EOT - 2, (length - 2,), generator=g)
        ids[row, length - 1] = EOT
    mask = (torch.arange(TEXT_LEN)[None] < torch.tensor(lengths)[:, None]).long()
    zero_padded = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    return ids, mask, zero_padded, pixels


def maxdiff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def state():
    return published_state(0)


@pytest.fixture(scope="module")
def ckpt_file(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("published") / "epoch=3-step=100.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.7.7"}, path)
    return path


@pytest.fixture(scope="module")
def imported(ckpt_file):
    model, config = build_imported(ckpt_file, top_k=K, **HEAD_OPTS)
    return model.eval(), config


# ---------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------


def test_config_from_shapes(imported):
    _, config = imported
    m = config["model"]
    assert config["family"] == "mmoe" and m["gate"] == "mmoe_reference"
    assert (m["image_dim"], m["text_hidden"], m["image_hidden"], m["cross_hidden"]) == (DV, TGLU, IDLU, CMFU)
    assert (m["num_experts"], m["top_k"], m["expert_mult"]) == (E, K, 4)
    enc = m["encoder"]
    assert enc["kind"] == "hf_clip"
    x = enc["extra"]
    assert (x["context_length"], x["text_positions"], x["image_size"], x["patch_size"]) == (
        TEXT_LEN,
        TEXT_POS,
        IMAGE,
        PATCH,
    )
    assert (x["text_layers"], x["vision_layers"], x["text_heads"], x["vision_heads"]) == (
        TEXT_LAYERS,
        VIS_LAYERS,
        TEXT_HEADS,
        VIS_HEADS,
    )
    assert (
        config["training"]["imported"]["format"] == "lightning"
        and config["training"]["imported"]["lightning"]["epoch"] == 3
    )


def _feature_encoder(model, sides):
    """Replace the model's encoder by one that returns given features (the matcher-level comparison)."""
    from mmoe_core.families.mmoe.features import EncodedSide

    class FeatureEncoder(torch.nn.Module):
        def __init__(self, towers):
            super().__init__()
            self.towers = towers

        def forward(self, ids, pixels, token_embeds=None, patch_embeds=None):
            side, rows = sides[int(pixels[0, 0])], pixels[:, 1].long()
            return EncodedSide(*(t[rows] for t in side))

    return FeatureEncoder(model.encoder.towers)


def _random_features(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, DT, generator=g),
        torch.randn(n, TEXT_LEN, DT, generator=g),
        torch.randn(n, DV, generator=g),
        torch.randn(n, TEXT_LEN, DV, generator=g),
    )


def test_matcher_scores_equal_published_forward(state, imported):
    """Same weights, same encoder features: MoEscope's scores == the published matcher's (1e-4)."""
    model, _ = imported
    n_ent, n_men = 7, 5
    ent, men = _random_features(n_ent, 1), _random_features(n_men, 2)
    encoder = model.encoder
    try:
        model.encoder = _feature_encoder(model, {0: ent, 1: men})
        ids_e, ids_m = torch.ones(n_ent, TEXT_LEN, dtype=torch.long), torch.ones(n_men, TEXT_LEN, dtype=torch.long)
        pix_e = torch.stack([torch.zeros(n_ent), torch.arange(n_ent, dtype=torch.float)], 1)
        pix_m = torch.stack([torch.ones(n_men), torch.arange(n_men, dtype=torch.float)], 1)
        with torch.no_grad():
            got = model.match(
                model.encode_entities(ids_e, pix_e, chunk_size=n_ent), model.encode_mentions(ids_m, pix_m)
            )
            # the published evaluation encodes the KB in chunks (eval_chunk_size): so does MoEscope
            chunked = model.match(
                model.encode_entities(ids_e, pix_e, chunk_size=4), model.encode_mentions(ids_m, pix_m)
            )
    finally:
        model.encoder = encoder
    with torch.no_grad():
        ref, (t, i, c) = ref_matcher(state, ent, men)
        ref_chunks = torch.cat([ref_matcher(state, tuple(x[a : a + 4] for x in ent), men)[0] for a in (0, 4)], dim=1)
    diffs = {
        "overall": maxdiff(got.overall, ref),
        "text": maxdiff(got.text, t),
        "image": maxdiff(got.image, i),
        "cross": maxdiff(got.cross, c),
        "chunked": maxdiff(chunked.overall, ref_chunks),
    }
    print("matcher-level max abs diff:", diffs)
    assert all(d < TOL for d in diffs.values()), diffs
    assert maxdiff(ref, ref_chunks) > 1e-3  # the reference gate really depends on the chunk: not a vacuous check


def test_encoder_features_equal_hf_layout_forward(state, imported):
    model, _ = imported
    ids, mask, zero_padded, pixels = hf_inputs(4, [5, TEXT_LEN, 9, 3], seed=3)
    with torch.no_grad():
        ref = ref_encoder(state, ids, mask, pixels)
        for name, id_version in (("hf-padded", ids), ("zero-padded", zero_padded)):
            got = model.encoder(id_version, pixels)
            diffs = [
                maxdiff(a, b) for a, b in zip((got.text_cls, got.text_tokens, got.image_cls, got.image_tokens), ref)
            ]
            print(f"encoder max abs diff ({name} ids): text_cls, text_tokens, image_cls, image_tokens =", diffs)
            assert max(diffs) < TOL, (name, diffs)
        unmasked = ref_encoder(state, ids, torch.ones_like(mask), pixels)
    assert maxdiff(unmasked[1], ref[1]) > 1e-2  # padding positions do depend on HF's attention mask


def test_end_to_end_scores_equal_published_forward(state, imported):
    """Token ids + pixels -> scores, against the reference encoder + matcher."""
    model, _ = imported
    ids_e, mask_e, zp_e, pix_e = hf_inputs(6, [4, 8, TEXT_LEN, 6, 3, 12], seed=4)
    ids_m, mask_m, zp_m, pix_m = hf_inputs(3, [7, 5, 10], seed=5)
    with torch.no_grad():
        ref, _ = ref_matcher(state, ref_encoder(state, ids_e, mask_e, pix_e), ref_encoder(state, ids_m, mask_m, pix_m))
        got = model.match(model.encode_entities(zp_e, pix_e, chunk_size=6), model.encode_mentions(zp_m, pix_m))
    d = maxdiff(got.overall, ref)
    print("end-to-end score max abs diff:", d)
    assert d < TOL


def test_end_to_end_exact_in_float64(state, imported):
    """In float64 the two forwards agree to rounding: the arithmetic is the same, not merely close."""
    import copy

    model = copy.deepcopy(imported[0]).double()
    sd64 = {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}
    ids_e, mask_e, zp_e, pix_e = hf_inputs(5, [4, TEXT_LEN, 6, 3, 12], seed=7)
    ids_m, mask_m, zp_m, pix_m = hf_inputs(3, [7, 5, 10], seed=8)
    pix_e, pix_m = pix_e.double(), pix_m.double()
    with torch.no_grad():
        ref, _ = ref_matcher(sd64, ref_encoder(sd64, ids_e, mask_e, pix_e), ref_encoder(sd64, ids_m, mask_m, pix_m))
        got = model.match(model.encode_entities(zp_e, pix_e, chunk_size=5), model.encode_mentions(zp_m, pix_m))
    d = maxdiff(got.overall, ref)
    print("end-to-end float64 max abs diff:", d)
    assert d < 1e-9


def test_against_transformers_clip_if_installed(state, imported):
    transformers = pytest.importorskip(
        "transformers",
        reason="transformers is not installed (optional): the HF-layout reference forward above covers the encoder",
    )
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=TEXT_W,
            intermediate_size=4 * TEXT_W,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=TEXT_HEADS,
            max_position_embeddings=TEXT_POS,
            hidden_act="quick_gelu",
            eos_token_id=2,
            bos_token_id=SOT,
            pad_token_id=EOT,
        ),
        vision_config=dict(
            hidden_size=VIS_W,
            intermediate_size=4 * VIS_W,
            num_hidden_layers=VIS_LAYERS,
            num_attention_heads=VIS_HEADS,
            image_size=IMAGE,
            patch_size=PATCH,
            hidden_act="quick_gelu",
        ),
        projection_dim=TEXT_W,
    )
    clip = CLIPModel(cfg).eval()
    hf = {k[len("encoder.clip.") :]: v for k, v in state.items() if k.startswith("encoder.clip.")}
    own = clip.state_dict()
    clip.load_state_dict({k: v for k, v in hf.items() if k in own}, strict=True)
    model, _ = imported
    ids, mask, zero_padded, pixels = hf_inputs(3, [6, TEXT_LEN, 4], seed=6)
    with torch.no_grad():
        out = clip(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        towers = model.encoder.towers
        tc, tt = towers.encode_text(zero_padded)
        ic, it = towers.encode_image(pixels)
    diffs = [
        maxdiff(out.text_embeds, tc),
        maxdiff(out.text_model_output[0], tt),
        maxdiff(out.image_embeds, ic),
        maxdiff(out.vision_model_output[0], it),
    ]
    print(f"transformers {transformers.__version__} CLIPModel max abs diff:", diffs)
    assert max(diffs) < TOL


def test_towers_have_every_attribute_of_open_clip_towers(imported):
    from mmoe_core.encoders import EncoderSpec, build_towers

    model, _ = imported
    plain = build_towers(EncoderSpec(kind="tiny", name="tiny-32"))
    assert set(vars(plain)) - set(vars(model.encoder.towers)) == set()
    assert model.encoder.towers.tokenize(["a [SEP] b"]).shape == (1, TEXT_LEN)


# ---------------------------------------------------------------------------------------------
# Files, layouts and refusals
# ---------------------------------------------------------------------------------------------


def test_lightning_ckpt_written_and_reloaded(tmp_path, ckpt_file, state, imported):
    from mmoe_core.adapter import load_adapter

    out = import_checkpoint(ckpt_file, tmp_path / "ckpt", top_k=K, **HEAD_OPTS)
    adapter = load_adapter(out, device="cpu")
    assert adapter.routed_layers()[0].gate_kind == "mmoe_reference"
    model, _ = imported
    for k, v in model.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[k], v), k


def test_plain_state_dict_layouts(tmp_path, state, imported):
    """.safetensors without the Lightning prefixes, and .pt with a DDP-style wrapper prefix."""
    from safetensors.torch import save_file

    bare = {
        (k.split(".", 1)[1] if k.startswith(("encoder.", "matcher.")) else k): v.contiguous() for k, v in state.items()
    }
    save_file(bare, str(tmp_path / "bare.safetensors"))
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "wrapped.pt")
    model, _ = imported
    for name in ("bare.safetensors", "wrapped.pt"):
        other, config = build_imported(tmp_path / name, top_k=K, **HEAD_OPTS)
        assert config["training"]["imported"]["format"] in ("safetensors", "state_dict")
        for k, v in model.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), (name, k)


def test_refusal_lists_missing_and_unexpected_keys(tmp_path, state):
    broken = dict(state)
    del broken["matcher.cross_module.gate_fc.weight"]
    del broken["encoder.clip.vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    broken["matcher.text_module.extra_head.weight"] = torch.zeros(2, 2)
    broken["encoder.clip.text_model.some_new_buffer"] = torch.zeros(2)
    broken["matcher.vision_module.fc_key.weight"] = torch.zeros(IDLU + 1, DV)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": broken, "epoch": 1}, path)
    out = tmp_path / "out"
    with pytest.raises(ImportRefused) as info:
        import_checkpoint(path, out, top_k=K, **HEAD_OPTS)
    msg = str(info.value)
    for key in (
        "matcher.text_module.extra_head.weight",
        "encoder.clip.text_model.some_new_buffer",
        "encoder.clip.vision_model.encoder.layers.1.self_attn.q_proj.bias",  # an incomplete q/k/v triple
        "matcher.cross_module.gate_fc.weight",  # missing
        "encoder.towers.clip.visual.transformer.resblocks.1.attn.in_proj_bias",
        "encoder.clip.vision_model.encoder.layers.1.self_attn.{q,k,v}_proj.bias",
        "matcher.vision_module.fc_key.weight",
    ):  # wrong shape
        assert key in msg, key
    assert not out.exists()
    assert main([str(path), "--out", str(out), "--top-k", "3", "--text-heads", "2", "--vision-heads", "3"]) == 2


def test_top_k_needed_without_hyper_parameters(ckpt_file):
    with pytest.raises(ImportRefused, match="--top-k"):
        build_imported(ckpt_file, **HEAD_OPTS)


def test_omegaconf_hyper_parameters_read_without_omegaconf(tmp_path, state, monkeypatch):
    """The published code saves an OmegaConf DictConfig as hyper_parameters. Simulate its pickle with
    look-alike classes registered under omegaconf's names (omegaconf itself is not needed to read it)."""
    fake = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes")}

    class DictConfig:
        def __init__(self, content):
            self.__dict__.update(_metadata=None, _parent=None, _content=content)

        def __getstate__(self):
            return dict(self.__dict__)

    class AnyNode:
        def __init__(self, val):
            self.__dict__.update(_metadata=None, _parent=None, _val=val)

        def __getstate__(self):
            return dict(self.__dict__)

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    AnyNode.__module__, AnyNode.__qualname__ = "omegaconf.nodes", "AnyNode"
    fake["omegaconf.dictconfig"].DictConfig = DictConfig
    fake["omegaconf.nodes"].AnyNode = AnyNode
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    hp = DictConfig(
        {
            "model": DictConfig({"top_experts": AnyNode(2), "num_experts": AnyNode(E)}),
            "data": DictConfig(
                {"text_max_length": AnyNode(TEXT_LEN), "eval_chunk_size": AnyNode(3), "eval_batch_size": AnyNode(20)}
            ),
        }
    )
    path = tmp_path / "with_hparams.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": hp, "hyper_parameters_type": DictConfig}, path)
    for name in fake:
        monkeypatch.delitem(sys.modules, name)  # reading must not need them
    _, config = build_imported(path, **HEAD_OPTS)
    assert config["model"]["top_k"] == 2 and config["model"]["entity_chunk_size"] == 3
    assert config["training"]["imported"]["hyper_parameters"]["data"]["eval_batch_size"] == 20
    assert "omegaconf.dictconfig.DictConfig" in config["training"]["imported"]["placeholders"]


class Payload:
    """An arbitrary object whose unpickling would run code (here: create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class SomeObject:
    def __init__(self):
        self.x = 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_arbitrary_objects_are_refused(tmp_path, state):
    marker = tmp_path / "pwned"
    for name, extra in (("payload", Payload(marker)), ("object", SomeObject())):
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": state, "epoch": 3, "extra": extra}, path)
        with pytest.raises(ImportRefused) as info:
            read_checkpoint(path)
        assert "state_dict" in str(info.value) and "you trust" in str(info.value)  # the export recipe is offered
        assert ("builtins.getattr" if name == "payload" else "SomeObject") in str(info.value)
    assert not marker.exists()
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(ImportRefused):
        read_checkpoint(legacy)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The imported run in the dashboard's pipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e  # import -> world -> precompute end to end: about a minute of CPU, so not in the unit tier
def test_precompute_shows_reference_gate_effects(tmp_path, ckpt_file):
    """Import, precompute on a tiny generated entity world, and find the reference gate's signature in the
    per-layer verdicts: expert E-1 never weighted (k = 3 of 4) and positions past E-1 unrouted."""
    generate = pytest.importorskip("mmoe_core.data.generate", reason="the demo world generator is not available")
    from analysis.precompute import precompute
    from analysis.store import RunStore

    world = tmp_path / "world"
    assert generate.main(["--world", "entity", "--scale", "tiny", "--quiet", "--out", str(world)]) in (0, None)
    ckpt = import_checkpoint(
        ckpt_file, tmp_path / "artifacts" / "checkpoints" / "imported", top_k=K, data_dir=str(world), **HEAD_OPTS
    )
    precompute(
        "imported",
        checkpoint=str(ckpt),
        data=str(world),
        root=tmp_path / "artifacts",
        progress=False,
        device="cpu",
        max_examples=12,
        batch_size=8,
        attribution_sample=2,
        projection="pca",
        dynamics_sample=4,
        batch_dependence_sample=4,
    )
    with RunStore("imported", root=tmp_path / "artifacts") as store:
        metrics = store.table("layer_metrics")
    assert set(metrics["layer"]) == {"text_intra", "image_intra", "cross_inter"}
    for _, row in metrics.iterrows():
        assert list(row["experts_never_weighted"]) == [E - 1], row["layer"]
        assert row["unrouted_fraction"] > 0.5, row["layer"]
        assert row["verdict"] != "healthy", row["layer"]
        assert "never" in row["reason"] and "unrouted" in row["reason"], row["reason"]
