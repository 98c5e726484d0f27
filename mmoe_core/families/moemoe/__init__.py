"""The MoEMoE family (multi-source multimodal QA)."""
from mmoe_core.moemoe import FAMILY, MoEMoEAdapter, MoEMoETrainer, build_model
from mmoe_core.registry import Family, register

FAMILY_ENTRY = register(Family(FAMILY, MoEMoEAdapter.title, MoEMoEAdapter, build_model=build_model,
                               trainer=MoEMoETrainer))
