"""A third model family, defined only here in tests/: it proves that a family plugs in through
:mod:`mmoe_core.registry` alone, with no line of ``pages/`` or ``analysis/`` naming it.

The rune world
--------------
Each *tablet* carries two inputs of different kinds: a **chant** (a few words) and a **sigil** (a 16 x 16
picture seen as a 4 x 4 grid of patches). Every tablet belongs to one of four runes, and exactly one of
its inputs says which (the ground-truth label ``witness``):

* ``witness = "chant"``: one word of the chant is the rune's name; the sigil is grey noise;
* ``witness = "sigil"``: one patch of the sigil is painted in the rune's colour; the chant is filler.

So the positions that carry the answer, and what the router sees, depend on a ground-truth label.
``cadence`` (short or long chant) is a label that decides nothing.

The model (``runeweave``)
-------------------------
``[CLS; chant words; sigil patches]`` -> one attention layer -> **weave** (a :class:`SwitchMoE`, 4 experts,
top-2 softmax gate, residual) -> the chant's and the sigil's max-pools, mixed by two **scales** (a softmax
over the two sources, the family's typed extra output) plus the CLS -> **sieve** (a routed layer of this
file's own, :class:`SigmoidSieve`: 3 experts, sigmoid scores, top-1, raw weights, honouring knockouts
through the :class:`RoutedModule` protocol) -> one logit per rune. The prediction is a ranking of the four
runes; the loss is cross-entropy.

Importing registers nothing: :func:`register` adds the family (``runeweave``), its world (``runes``) and
the world's dataset-browser view (tests/test_toy_family.py does, for its module only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core import registry
from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.data.views import DatasetView, TableView, register_view
from mmoe_core.errors import ConfigError
from mmoe_core.limits import Limit, check_limits, check_object
from mmoe_core.moe import SwitchMoE
from mmoe_core.routing_record import PositionMeta, RouterOutput, RoutingRecorder
from mmoe_core.spec import (
    AttributionTarget,
    ExampleField,
    GateSpec,
    ImageGrid,
    InputSpec,
    LabelSpec,
    OutputSpec,
    PredictionSpec,
    RoutedLayerSpec,
    SourceSpec,
)

FAMILY = "runeweave"
WORLD = "runes"
CALL = "tablet"
RUNES = ("ember", "frost", "gale", "loam")
RUNE_COLOURS = {"ember": (225, 45, 30), "frost": (60, 200, 235), "gale": (235, 225, 60), "loam": (120, 72, 20)}
FILLER = (
    "the",
    "old",
    "stone",
    "sings",
    "under",
    "moon",
    "we",
    "carve",
    "slow",
    "deep",
    "night",
    "again",
    "cold",
    "hands",
    "river",
    "bright",
)
PAD, UNK, CLS = "<pad>", "<unk>", "[CLS]"
VOCAB = (PAD, UNK, *FILLER, *RUNES)
MAX_WORDS = 8
GRID = 4  # the sigil is GRID x GRID patches ...
PATCH = 4  # ... of PATCH x PATCH pixels
SIDE = GRID * PATCH
WORLD_SIZES = {"tiny": (320, 96), "default": (2000, 400)}  # scale -> (train, test) tablets

# Names the test greps pages/ and analysis/ for: none may appear there.
DECLARED_NAMES = (
    FAMILY,
    WORLD,
    "chant",
    "sigil",
    "rune",
    "tablet",
    "witness",
    "cadence",
    "weave",
    "sieve",
    "chant_tokens",
    "sigil_patches",
)


# ---------------------------------------------------------------------------------------------
# The world: written to a folder (world.json, <split>.jsonl, sigils/*.png), read back from it
# ---------------------------------------------------------------------------------------------


def _tablet(rng: np.random.Generator, split: str, i: int) -> tuple[dict, np.ndarray]:
    rune = RUNES[int(rng.integers(len(RUNES)))]
    witness = "chant" if rng.random() < 0.5 else "sigil"
    length = int(rng.integers(3, MAX_WORDS + 1))
    words = [FILLER[int(j)] for j in rng.integers(len(FILLER), size=length)]
    pixels = rng.integers(90, 160, size=(SIDE, SIDE, 1)).repeat(3, axis=2).astype(np.uint8)
    if witness == "chant":
        words[int(rng.integers(length))] = rune
    else:
        r, c = (int(v) for v in rng.integers(GRID, size=2))
        pixels[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = RUNE_COLOURS[rune]
    record = {
        "id": f"{split}-{i:04d}",
        "chant": " ".join(words),
        "sigil": f"sigils/{split}-{i:04d}.png",
        "rune": rune,
        "witness": witness,
        "cadence": "long" if length > 5 else "short",
    }
    return record, pixels


def build_world(out_dir: Path, scale: str = "tiny", seed: int = 0) -> Path:
    """Write the rune world at ``scale`` ("tiny" | "default") into ``out_dir``."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "sigils").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = dict(zip(("train", "test"), WORLD_SIZES[scale]))
    for split, n in counts.items():
        lines = []
        for i in range(n):
            record, pixels = _tablet(rng, split, i)
            Image.fromarray(pixels, "RGB").save(out_dir / record["sigil"])
            lines.append(json.dumps(record))
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (out_dir / "world.json").write_text(json.dumps({"world": WORLD, "scale": scale, "seed": seed, "counts": counts}))
    return out_dir


def tablet_rows(data_dir: Path) -> pd.DataFrame:
    """Every tablet of both splits, for the dataset browser (sigil as a picture path)."""
    rows = []
    for split in ("train", "test"):
        for e in read_examples(data_dir, split):
            rows.append({"id": e["id"], "split": split, "chant": e["chant"], "sigil": e["sigil"], **e["labels"]})
    return pd.DataFrame(rows)


def world_is_built(out_dir: Path, scale: str = "tiny", seed: int = 0) -> bool:
    marker = Path(out_dir) / "world.json"
    if not marker.is_file():
        return False
    meta = json.loads(marker.read_text())
    return meta.get("scale") == scale and meta.get("seed") == seed


def read_examples(data_dir: Path, split: str = "test") -> list[dict]:
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} split in this rune world")
    examples = []
    for i, line in enumerate(ln for ln in path.read_text().splitlines() if ln.strip()):
        r = json.loads(line)
        examples.append(
            {
                "index": i,
                "id": r["id"],
                "tablet": r["id"],
                "chant": r["chant"],
                "sigil": str((data_dir / r["sigil"]).resolve()),
                "rune": r["rune"],
                "labels": {"witness": r["witness"], "rune": r["rune"], "cadence": r["cadence"]},
            }
        )
    return examples


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def tokenize(chants: Sequence[str], vocab: Sequence[str] = VOCAB) -> Tensor:
    ids = {w: i for i, w in enumerate(vocab)}
    out = torch.zeros(len(chants), MAX_WORDS, dtype=torch.long)
    for row, chant in enumerate(chants):
        words = str(chant or "").lower().split()[:MAX_WORDS]
        out[row, : len(words)] = torch.tensor([ids.get(w, ids[UNK]) for w in words], dtype=torch.long)
    return out


def patches_of(images: Sequence) -> Tensor:
    """[B, GRID*GRID, PATCH*PATCH*3] in [0, 1]: each image (PIL or a path; None = black) row-major."""
    from PIL import Image

    rows = []
    for image in images:
        if image is None:
            array = np.zeros((SIDE, SIDE, 3), dtype=np.float32)
        else:
            if not isinstance(image, Image.Image):
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            array = (
                np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.NEAREST), dtype=np.float32)
                / 255.0
            )
        grid = array.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(GRID * GRID, -1)
        rows.append(torch.from_numpy(np.ascontiguousarray(grid)))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SigmoidSieve(nn.Module):
    """A routed layer that is not a :class:`SwitchMoE`: sigmoid scores per expert, the top-k kept with
    their raw scores as combine weights (no renormalisation), a tanh expert each. It follows the
    :class:`mmoe_core.adapter.RoutedModule` protocol (``name``, ``num_experts``, ``knocked_out``)."""

    def __init__(self, dim: int, num_experts: int = 3, top_k: int = 1, name: str = "sieve"):
        super().__init__()
        self.name, self.num_experts, self.top_k = name, num_experts, top_k
        self.knocked_out: frozenset[int] = frozenset()
        self.router = nn.Linear(dim, num_experts)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(num_experts)])

    def forward(self, z: Tensor, recorder: RoutingRecorder | None = None, meta: PositionMeta | None = None) -> Tensor:
        logits = self.router(z)
        scores = torch.sigmoid(logits)
        if self.knocked_out:  # a knocked-out expert scores 0 and can never be chosen
            blocked = torch.zeros(self.num_experts, dtype=torch.bool, device=z.device)
            blocked[sorted(self.knocked_out)] = True
            scores = scores.masked_fill(blocked, 0.0)
            choice = scores.masked_fill(blocked, -1.0)
        else:
            choice = scores
        top_ids = choice.topk(self.top_k, dim=-1).indices
        combine = torch.zeros_like(scores).scatter(-1, top_ids, scores.gather(-1, top_ids))
        if recorder is not None:
            recorder.add(self.name, RouterOutput(logits, scores, top_ids, combine), meta)
        outputs = torch.stack([expert(z) for expert in self.experts], dim=-1)  # [B, D, E]
        return (combine.unsqueeze(-2) * outputs).sum(dim=-1)


def default_model_config(dim: int = 32, experts: int = 4, top_k: int = 2, sieve_experts: int = 3) -> dict:
    return {
        "vocab": list(VOCAB),
        "runes": list(RUNES),
        "max_words": MAX_WORDS,
        "grid": GRID,
        "patch": PATCH,
        "dim": dim,
        "experts": experts,
        "top_k": top_k,
        "sieve_experts": sieve_experts,
        "sieve_top_k": 1,
    }


class RuneModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        d, patches = int(cfg["dim"]), int(cfg["grid"]) ** 2
        self.words = list(cfg["vocab"])
        self.runes = list(cfg["runes"])
        self.word_embed = nn.Embedding(len(self.words), d, padding_idx=0)
        self.patch_embed = nn.Linear(int(cfg["patch"]) ** 2 * 3, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.word_pos = nn.Parameter(torch.randn(1, int(cfg["max_words"]), d) * 0.02)
        self.patch_pos = nn.Parameter(torch.randn(1, patches, d) * 0.02)
        self.modality = nn.Parameter(torch.randn(3, d) * 0.02)  # joint (CLS), text, image
        self.mixer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.weave = SwitchMoE(d, d, num_experts=int(cfg["experts"]), top_k=int(cfg["top_k"]), mult=2, name="weave")
        self.norm = nn.LayerNorm(d)
        self.scales = nn.Linear(2 * d, 2)
        self.sieve = SigmoidSieve(d, int(cfg["sieve_experts"]), int(cfg["sieve_top_k"]), name="sieve")
        self.head = nn.Linear(d, len(self.runes))

    def embed_words(self, ids: Tensor) -> Tensor:
        return self.word_embed(ids)

    def embed_patches(self, patches: Tensor) -> Tensor:
        return self.patch_embed(patches)

    def word_strings(self, ids: Tensor) -> list[list[str]]:
        return [[self.words[int(i)] for i in row] for row in ids.tolist()]

    def meta(self, ids: Tensor, example_ids: Sequence[int]) -> tuple[PositionMeta, PositionMeta]:
        n_words, n_patches = ids.shape[1], self.patch_pos.shape[1]
        grid = int(self.cfg["grid"])
        kinds = ["cls"] + ["text_token"] * n_words + ["image_patch"] * n_patches
        modality = ["joint"] + ["text"] * n_words + ["image"] * n_patches
        cells = [None] * (1 + n_words) + [(r, c) for r in range(grid) for c in range(grid)]
        patch_names = [f"patch {r},{c}" for r in range(grid) for c in range(grid)]
        tokens = [[CLS, *row, *patch_names] for row in self.word_strings(ids.cpu())]
        valid = torch.cat(
            [
                torch.ones(len(ids), 1, dtype=torch.bool),
                ids.cpu() != 0,
                torch.ones(len(ids), n_patches, dtype=torch.bool),
            ],
            dim=1,
        )
        sequence = PositionMeta(CALL, list(example_ids), kinds, modality, modality, tokens, valid, grid=cells)
        pooled = PositionMeta(CALL, list(example_ids), ["pooled"], ["joint"], ["joint"], [["pooled tablet"]] * len(ids))
        return sequence, pooled

    def forward(
        self,
        ids: Tensor,
        patches: Tensor,
        example_ids: Sequence[int] | None = None,
        recorder: RoutingRecorder | None = None,
        word_embeds: Tensor | None = None,
        patch_embeds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        b = ids.shape[0]
        word_embeds = self.embed_words(ids) if word_embeds is None else word_embeds
        patch_embeds = self.embed_patches(patches) if patch_embeds is None else patch_embeds
        words = word_embeds + self.word_pos[:, : ids.shape[1]] + self.modality[1]
        pics = patch_embeds + self.patch_pos + self.modality[2]
        x = torch.cat([(self.cls + self.modality[0]).expand(b, -1, -1), words, pics], dim=1)
        word_valid = ids != 0
        valid = torch.cat(
            [
                torch.ones(b, 1, dtype=torch.bool, device=ids.device),
                word_valid,
                torch.ones(b, pics.shape[1], dtype=torch.bool, device=ids.device),
            ],
            dim=1,
        )
        x = self.mixer(x, src_key_padding_mask=~valid)
        metas = (
            self.meta(ids, example_ids if example_ids is not None else range(b))
            if recorder is not None
            else (None, None)
        )
        h = self.norm(x + self.weave(x, recorder=recorder, meta=metas[0]))
        n = ids.shape[1]
        chant = h[:, 1 : 1 + n].masked_fill(~word_valid.unsqueeze(-1), -1e4).amax(dim=1)
        chant = torch.where(word_valid.any(dim=1, keepdim=True), chant, torch.zeros_like(chant))
        sigil = h[:, 1 + n :].amax(dim=1)
        weights = F.softmax(self.scales(torch.cat([chant, sigil], dim=-1)), dim=-1)
        z = weights[:, :1] * chant + weights[:, 1:] * sigil + h[:, 0]
        z = z + self.sieve(z, recorder=recorder, meta=metas[1])
        return {"logits": self.head(z), "weights": weights, "representation": z}


MODEL_LIMITS = {
    "dim": Limit(2, 1024),
    "experts": Limit(1, 64),
    "top_k": Limit(1, 64),
    "sieve_experts": Limit(1, 64),
    "sieve_top_k": Limit(1, 64),
    "max_words": Limit(1, 512),
    "grid": Limit(1, 64),
    "patch": Limit(1, 64),
}
REQUIRED = (*MODEL_LIMITS, "vocab", "runes")


def check_model_config(config: dict, where: str) -> None:
    """ConfigError unless config.json's "model" section is well typed and of sane sizes (before any build)."""
    section = check_object(config.get("model"), f"{where}: model")
    missing = [key for key in REQUIRED if key not in section]
    if missing:
        raise ConfigError(f"{where}: model is missing {missing}")
    check_limits(section, MODEL_LIMITS, f"{where}: model")
    if section["top_k"] > section["experts"] or section["sieve_top_k"] > section["sieve_experts"]:
        raise ConfigError(f"{where}: model: a top-k exceeds its expert count")
    if section["dim"] % 2:
        raise ConfigError(f"{where}: model.dim {section['dim']} is not a multiple of the 2 attention heads")
    for key, most in (("vocab", 10_000), ("runes", 1_000)):
        words = section[key]
        if not isinstance(words, list) or not 0 < len(words) <= most or not all(isinstance(w, str) for w in words):
            raise ConfigError(f"{where}: model.{key} must be a list of 1 to {most:,} strings")


def build_model(config: dict) -> RuneModel:
    return RuneModel(config["model"])


# ---------------------------------------------------------------------------------------------
# The trainer (mmoe_core.training.FamilyTrainer)
# ---------------------------------------------------------------------------------------------


class RuneTrainer:
    """Cross-entropy over the four runes, ``options.batch_size`` tablets a step.
    ``options.family_options``: any key of :func:`default_model_config` (``dim``, ``sieve_experts`` ...)."""

    family = FAMILY

    def __init__(self, options):
        self.options = options
        self.examples = read_examples(options.data_dir, "train")
        self._config = default_model_config(
            experts=options.experts, top_k=min(options.top_k, options.experts), **dict(options.family_options or {})
        )

    def model_config(self) -> dict:
        return self._config

    def data_config(self) -> dict:
        return {"root": str(self.options.data_dir), "world": WORLD, "split": "train", "examples": len(self.examples)}

    def build_model(self, config: dict) -> RuneModel:
        return build_model(config)

    def setup(self, model: RuneModel, device) -> None:
        self.ids = tokenize([e["chant"] for e in self.examples], model.words)
        self.patches = patches_of([e["sigil"] for e in self.examples])
        self.targets = torch.tensor([model.runes.index(e["rune"]) for e in self.examples])

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.options.batch_size)

    def train_batches(self, rng: np.random.Generator, epoch: int):
        order = rng.permutation(len(self.examples))
        for start in range(0, len(order), self.options.batch_size):
            rows = torch.as_tensor(order[start : start + self.options.batch_size])
            yield {
                "ids": self.ids[rows],
                "patches": self.patches[rows],
                "targets": self.targets[rows],
                "example_ids": rows.tolist(),
            }

    def loss_parts(self, model: RuneModel, batch: dict, recorder: RoutingRecorder | None) -> dict[str, Tensor]:
        out = model(batch["ids"], batch["patches"], batch["example_ids"], recorder)
        return {"ce": F.cross_entropy(out["logits"], batch["targets"])}


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class RuneAdapter(ModelAdapter):
    family = FAMILY
    title = "Runeweave: which rune is on the tablet (a toy family of the tests)"
    model: RuneModel

    # ---- declarations --------------------------------------------------------------------------
    def fields(self) -> list[ExampleField]:
        return [
            ExampleField("chant", "Chant", "text", editable=True, role="title", max_chars=80),
            ExampleField("sigil", "Sigil", "image", editable=True),
            ExampleField("rune", "Gold rune", "category", role="gold"),
            ExampleField("tablet", "Tablet", "id"),
        ]

    def input_spec(self) -> list[InputSpec]:
        grid = int(self.model.cfg["grid"])
        return [
            InputSpec("chant_tokens", "text_tokens", "chant word embeddings", field="chant"),
            InputSpec(
                "sigil_patches",
                "image_patches",
                "sigil patch embeddings (4 x 4 pixels each)",
                field="sigil",
                grid=ImageGrid(grid, grid, 0),
            ),
        ]

    def routed_layers(self) -> list[RoutedLayerSpec]:
        cfg = self.model.cfg
        return [
            RoutedLayerSpec(
                "weave",
                int(cfg["experts"]),
                int(cfg["top_k"]),
                GateSpec("topk_softmax", "softmax", "topk_renormalised"),
                routed="[CLS; chant words; sigil patches] after one attention layer",
                gate_sees="the same sequence",
                calls=(CALL,),
            ),
            RoutedLayerSpec(
                "sieve",
                int(cfg["sieve_experts"]),
                int(cfg["sieve_top_k"]),
                GateSpec(
                    "sigmoid_top1", "sigmoid", "topk_raw", note="independent sigmoid scores: they need not sum to 1"
                ),
                routed="the pooled tablet vector",
                gate_sees="the same vector",
                calls=(CALL,),
            ),
        ]

    def prediction_spec(self) -> PredictionSpec:
        return PredictionSpec("ranking", "the four runes ranked by logit", headline=("hits@1", "mrr"), item="rune")

    def attribution_targets(self) -> list[AttributionTarget]:
        return [
            AttributionTarget("score", "logit of the gold rune (the predicted one when there is no gold)"),
            AttributionTarget("router_logit", "router logit of (layer, expert, position)", needs_layer=True),
        ]

    def output_spec(self) -> list[OutputSpec]:
        return [
            OutputSpec(
                "scales",
                "source_weights",
                "the two scales: how much of the pooled tablet comes from the chant and from the sigil",
                sources=(
                    SourceSpec("chant", "chant_weight", "weight on the chant", "#2ca02c"),
                    SourceSpec("sigil", "sigil_weight", "weight on the sigil", "#9467bd"),
                ),
                truth_label="witness",
                positions="positions",
            )
        ]

    def label_spec(self) -> list[LabelSpec]:
        return [
            LabelSpec(
                "witness",
                "which input names the rune (generated with the world)",
                ground_truth=True,
                decides={"chant": ("chant_tokens", "chant"), "sigil": ("sigil_patches", "sigil")},
            ),
            LabelSpec("rune", "the tablet's rune", ground_truth=True),
            LabelSpec("cadence", "chant length (short: up to 5 words)"),
        ]

    def model_card(self) -> dict[str, str]:
        cfg = self.model.cfg
        return {
            "width": str(cfg["dim"]),
            "weave": f"{cfg['experts']} experts, top-{cfg['top_k']}",
            "sieve": f"{cfg['sieve_experts']} experts, top-{cfg['sieve_top_k']}, sigmoid",
            "vocabulary": f"{len(cfg['vocab'])} words",
        }

    def notes(self) -> list[str]:
        return ["The sieve gate scores each expert with its own sigmoid: its scores do not sum to 1."]

    # ---- data ----------------------------------------------------------------------------------
    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        return read_examples(data_dir, split)

    def _inputs(self, examples: Sequence[dict]) -> tuple[Tensor, Tensor]:
        ids = tokenize([e.get("chant") for e in examples], self.model.words)
        return ids.to(self.device), patches_of([e.get("sigil") for e in examples]).to(self.device)

    # ---- running -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self, examples: Sequence[dict], record: bool = True, batch_size: int = 32, progress: bool = False
    ) -> RunOutput:
        recorder = RoutingRecorder() if record else None
        predictions, scales, reps = [], [], []
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start : start + batch_size])
            ids, patches = self._inputs(chunk)
            out = self.model.eval()(ids, patches, [int(e["index"]) for e in chunk], recorder)
            predictions += self._predictions(chunk, out["logits"].float().cpu())
            weights = out["weights"].float().cpu()
            scales += [
                {
                    "index": int(e["index"]),
                    "positions": ["pooled tablet"],
                    "chant_weight": [float(weights[row, 0])],
                    "sigil_weight": [float(weights[row, 1])],
                }
                for row, e in enumerate(chunk)
            ]
            reps.append(out["representation"].float().cpu())
        return RunOutput(predictions, recorder, {"scales": scales}, torch.cat(reps) if reps else None)

    def _predictions(self, chunk: Sequence[dict], logits: Tensor) -> list[dict]:
        runes = self.model.runes
        out = []
        for row, example in enumerate(chunk):
            order = logits[row].argsort(descending=True).tolist()
            gold = example.get("rune")
            gold_id = runes.index(gold) if gold in runes else None
            rank = order.index(gold_id) + 1 if gold_id is not None else None
            out.append(
                {
                    "index": int(example["index"]),
                    "id": example.get("id"),
                    "prediction": runes[order[0]],
                    "prediction_id": order[0],
                    "score": float(logits[row, order[0]]),
                    "gold": gold,
                    "gold_id": gold_id,
                    "rank": rank,
                    "correct": None if rank is None else rank == 1,
                    "top_ids": order,
                    "top_names": [runes[i] for i in order],
                    "top_scores": [float(logits[row, i]) for i in order],
                }
            )
        return out

    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        labels = {int(e["index"]): e.get("labels", {}) for e in examples}
        ranked = [p for p in predictions if p.get("rank") is not None]

        def metrics(rows: list[dict]) -> dict:
            return {
                "hits@1": float(np.mean([p["rank"] == 1 for p in rows])) if rows else float("nan"),
                "mrr": float(np.mean([1.0 / p["rank"] for p in rows])) if rows else float("nan"),
                "examples": len(rows),
            }

        summary = {"overall": metrics(ranked)}
        for label in ("witness", "rune", "cadence"):
            groups: dict[str, list[dict]] = {}
            for p in ranked:
                groups.setdefault(str(labels.get(int(p["index"]), {}).get(label)), []).append(p)
            summary[f"by_{label}"] = {value: metrics(rows) for value, rows in sorted(groups.items())}
        return summary

    # ---- attribution ---------------------------------------------------------------------------
    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        ids, patches = self._inputs([example])
        with torch.no_grad():
            return {"chant_tokens": self.model.embed_words(ids), "sigil_patches": self.model.embed_patches(patches)}

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        ids, _ = self._inputs([example])
        grid = int(self.model.cfg["grid"])
        return {
            "chant_tokens": self.model.word_strings(ids.cpu())[0],
            "sigil_patches": [f"patch {r},{c}" for r in range(grid) for c in range(grid)],
        }

    def attribution_forward(
        self,
        example: dict,
        target: str,
        layer: str | None = None,
        expert: int | None = None,
        position: int | None = None,
        call: str | None = None,
    ) -> Callable[..., Tensor]:
        ids, patches = self._inputs([example])
        model = self.model.eval()

        def forward(word_embeds: Tensor, patch_embeds: Tensor, recorder: RoutingRecorder | None = None):
            n = word_embeds.shape[0]
            return model(
                ids.expand(n, -1),
                patches.expand(n, -1, -1),
                [int(example.get("index", 0))] * n,
                recorder,
                word_embeds,
                patch_embeds,
            )

        if target == "score":
            gold = example.get("rune")
            if gold in model.runes:
                rune = model.runes.index(gold)
            else:
                with torch.no_grad():
                    rune = int(model(ids, patches)["logits"][0].argmax())
            return lambda word_embeds, patch_embeds: forward(word_embeds, patch_embeds)["logits"][:, rune]
        if target == "router_logit":
            layers = self.routed_modules()
            if layer not in layers:
                raise KeyError(f"unknown routed layer {layer!r}; layers: {sorted(layers)}")
            if call not in (None, CALL):
                raise ValueError(f"{layer} is only called as {CALL!r}, not {call!r}")
            if expert is None or not 0 <= expert < layers[layer].num_experts:
                raise ValueError(f"expert must be in 0..{layers[layer].num_experts - 1}, got {expert}")
            length = 1 if layer == "sieve" else 1 + ids.shape[1] + model.patch_pos.shape[1]
            if position is None or not 0 <= position < length:
                raise ValueError(f"position must be in 0..{length - 1} for {layer}, got {position}")

            def router_logit(word_embeds: Tensor, patch_embeds: Tensor) -> Tensor:
                recorder = RoutingRecorder(keep_graph=True)
                forward(word_embeds, patch_embeds, recorder)
                logits = next(c.router.logits for c in recorder.calls if c.layer == layer)
                return logits[:, expert] if logits.dim() == 2 else logits[:, position, expert]

            return router_logit
        raise ValueError(f"unknown attribution target {target!r}; choose score or router_logit")


def register() -> None:
    """Register the family, its world and the world's dataset-browser view, as a plug-in would: through
    the public registries (:func:`mmoe_core.registry.register`, ``register_world``, ``register_view``)."""
    registry.register(
        registry.Family(
            FAMILY,
            RuneAdapter.title,
            RuneAdapter,
            build_model=build_model,
            trainer=RuneTrainer,
            check_config=check_model_config,
        )
    )
    registry.register_world(
        registry.World(WORLD, build_world, world_is_built, "tablets whose chant or sigil names their rune")
    )
    register_view(
        DatasetView(
            WORLD,
            "Rune world",
            "Tablets with a chant and a sigil; one of the two names the tablet's rune.",
            (
                TableView(
                    "Tablets",
                    "every tablet, with the input that names its rune",
                    tablet_rows,
                    filters=("witness", "rune", "cadence"),
                    split="split",
                    title="chant",
                    image="sigil",
                    details=("chant", "rune", "witness", "cadence"),
                ),
            ),
        )
    )
