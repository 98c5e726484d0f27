"""Examples -> model inputs for Hugging Face MoE models, and the per-position description of them.

* Text models: the example's ``text`` tokenised (BOS prepended when the tokenizer has one and does
  not add it), left-padded; position ids from the attention mask.
* Vision-language models: one user turn of [question, picture, text] (or [picture, text, question]:
  the checkpoint's ``moescope.json`` may say ``"prompt_order": "question_last"``) rendered with the
  processor's chat template when it has one (else the same parts joined by spaces), then the
  processor (pixel values, ``image_grid_thw``, ``mm_token_type_ids``, the image placeholder tokens
  expanded to one per merged patch cell).

:func:`position_meta` says what each position is: ``image_patch`` for the image placeholder tokens
(modality image; their (row, col) cell of the merged patch grid), ``text_token`` for the prompt's
text, ``decoder_step`` for generated answer tokens, padding not recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from mmoe_core.routing_record import PositionMeta

CALL = "tokens"


def question_text(example: dict) -> str:
    question = example.get("question")
    return f"question: {question}" if question else ""


def prompt_text(example: dict) -> str:
    """The text of the prompt: the question first (when there is one), then the example's text, so
    that every text position (and the picture's) is read knowing the question."""
    text = str(example.get("text") or "")
    question = question_text(example)
    return f"{question}\n{text}" if question else text


def example_image(example: dict) -> Image.Image | None:
    if example.get("image") is not None:  # a PIL image built by hand (live playground)
        return example["image"].convert("RGB")
    path = example.get("image_path")
    if not path:
        return None
    from mmoe_core.data.images import open_image_checked

    return open_image_checked(path)  # PNG, JPEG or WebP within the pixel cap


def encode_texts(tokenizer, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
    """Left-padded ids + mask (+ position ids) for a text model; BOS first when the tokenizer has one."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if max_length is not None:
            ids = ids[:max_length]
        rows.append(ids or [tokenizer.eos_token_id or 0])
    return pad_left(rows, pad_id(tokenizer))


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> dict[str, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, length - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask)}


def positions_from_mask(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


QUESTION_FIRST, QUESTION_LAST = "question_first", "question_last"


def vl_prompt(processor, example: dict, has_image: bool, order: str = QUESTION_FIRST) -> str:
    """One user turn: [question, picture, text] (``question_first``) or [picture, text, question]."""
    question, text = question_text(example), str(example.get("text") or "")
    parts = (
        [("text", question), ("image", None), ("text", text)]
        if order == QUESTION_FIRST
        else [("image", None), ("text", text), ("text", question)]
    )
    parts = [(kind, value) for kind, value in parts if (value if kind == "text" else has_image)]
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} if kind == "image" else {"type": "text", "text": value} for kind, value in parts]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    tok = processor.tokenizer
    start = getattr(tok, "vision_start_token", None) or ""
    end = getattr(tok, "vision_end_token", None) or ""
    picture = f"{start}{processor.image_token}{end}"
    return " ".join(picture if kind == "image" else value for kind, value in parts)


def encode_vl(processor, examples: Sequence[dict], order: str = QUESTION_FIRST) -> dict[str, Tensor]:
    """Processor outputs for a batch of examples (left-padded; pictures of the examples that have one)."""
    images = [example_image(e) for e in examples]
    prompts = [vl_prompt(processor, e, img is not None, order) for e, img in zip(examples, images)]
    present = [img for img in images if img is not None]
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = processor(text=prompts, images=present or None, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return dict(enc)


@dataclass
class ImageLayout:
    """Where each picture's placeholder tokens sit and their merged-grid cells."""

    merge: int
    grids: list[tuple[int, int, int] | None]  # per row: (t, h, w) patches of its picture, None without one


def image_layout(config, enc: dict, rows: int) -> ImageLayout:
    merge = int(getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1)
    thw = enc.get("image_grid_thw")
    token_id = image_token_id(config)
    grids: list[tuple[int, int, int] | None] = []
    k = 0
    for b in range(rows):
        has = token_id is not None and bool((enc["input_ids"][b] == token_id).any())
        if has and thw is not None and k < len(thw):
            grids.append(tuple(int(x) for x in thw[k]))
            k += 1
        else:
            grids.append(None)
    return ImageLayout(merge, grids)


def image_token_id(config) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def position_meta(
    tokenizer,
    config,
    input_ids: Tensor,
    valid: Tensor,
    example_ids: Sequence[int],
    answer_start: Sequence[int] | None = None,
    layout: ImageLayout | None = None,
) -> PositionMeta:
    """Per (row, position): kind, modality, token string and image cell of a recorded forward."""
    token_id = image_token_id(config)
    kinds, modality, tokens, cells = [], [], [], []
    ids = input_ids.cpu()
    for b in range(ids.shape[0]):
        row_ids = ids[b].tolist()
        strings = tokenizer.convert_ids_to_tokens(row_ids)
        grid = layout.grids[b] if layout is not None else None
        cols = (grid[2] // layout.merge) if grid else 0
        k_row, m_row, t_row, c_row = [], [], [], []
        image_seen = 0
        for j, tid in enumerate(row_ids):
            if token_id is not None and tid == token_id:
                cell = (image_seen // cols, image_seen % cols) if cols else None
                image_seen += 1
                k_row.append("image_patch"), m_row.append("image"), c_row.append(cell)
                t_row.append(f"<image {cell[0]},{cell[1]}>" if cell else "<image>")
                continue
            answer = answer_start is not None and j >= answer_start[b]
            k_row.append("decoder_step" if answer else "text_token"), m_row.append("text"), c_row.append(None)
            t_row.append(str(strings[j]))
        kinds.append(k_row), modality.append(m_row), tokens.append(t_row), cells.append(c_row)
    return PositionMeta(
        CALL, [int(i) for i in example_ids], kinds, modality, modality, tokens, valid.bool().cpu(), "example", cells
    )


def patch_order(thw: tuple[int, int, int], merge: int) -> Tensor:
    """For a Qwen-VL picture of (t, h, w) patches: the processor's patch index of each row-major
    (row, col) patch (the processor lays patches out merge-window by merge-window)."""
    t, h, w = thw
    index = torch.arange(t * h * w).reshape(t, h // merge, w // merge, merge, merge)
    return index.permute(0, 1, 3, 2, 4).reshape(-1)  # (t, row block, row in block, col block, col in block)
