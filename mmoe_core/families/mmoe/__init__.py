"""The MMoE family (multimodal entity linking)."""
from mmoe_core.mmoe import FAMILY, MMoEAdapter, MMoETrainer, build_model
from mmoe_core.registry import Family, register

FAMILY_ENTRY = register(Family(FAMILY, MMoEAdapter.title, MMoEAdapter, build_model=build_model, trainer=MMoETrainer))
