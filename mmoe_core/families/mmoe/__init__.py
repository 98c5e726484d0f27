"""The MMoE family (multimodal entity linking, Hu et al. KDD 2025): one module per job.

config (names, MMoEConfig) -> features (tensors between the sides, routing layouts) -> model (encoder,
units, matcher) ; data (texts, images, KB inputs, examples) ; adapter (the dashboard's contract) ;
trainer (hard-negative batches, the FamilyTrainer) ; ranking / kb_ranking (ranks over a whole KB) ;
dme (description-aware mention enhancement) ; hf_clip_map + import_mmoe (published checkpoints).
Model configs and demo recipes are JSON data in ``model_configs/`` and ``recipes/`` (mmoe_core.factory).
"""

from mmoe_core.factory import family_demo_runs
from mmoe_core.families.mmoe.adapter import MMoEAdapter
from mmoe_core.families.mmoe.config import FAMILY, check_model_config
from mmoe_core.families.mmoe.model import build_model
from mmoe_core.families.mmoe.trainer import MMoETrainer
from mmoe_core.registry import Family, register

FAMILY_ENTRY = register(
    Family(
        FAMILY,
        MMoEAdapter.title,
        MMoEAdapter,
        build_model=build_model,
        trainer=MMoETrainer,
        check_config=check_model_config,
        demo_runs=family_demo_runs(FAMILY),
    )
)
