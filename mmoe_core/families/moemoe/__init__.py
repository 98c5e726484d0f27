"""The MoEMoE family (multi-source multimodal QA, arXiv 2503.06296): one module per job.

config (names, the model config schema) ; vocab (the closed answer vocabulary) ; ops
(pure functions: lengths, QGA weights, losses, copy targets) -> model (QGA, decoder, MoEMoEModel) ;
data (examples, featurizer) ; adapter (the dashboard's contract) ; trainer (loss, image warm-up, the
FamilyTrainer). Model configs and demo recipes are JSON data in ``model_configs/`` and ``recipes/``
(mmoe_core.factory).
"""

from mmoe_core.factory import family_demo_runs
from mmoe_core.families.moemoe.adapter import MoEMoEAdapter
from mmoe_core.families.moemoe.config import FAMILY, check_model_config
from mmoe_core.families.moemoe.model import build_model
from mmoe_core.families.moemoe.trainer import MoEMoETrainer
from mmoe_core.registry import Family, register

FAMILY_ENTRY = register(
    Family(
        FAMILY,
        MoEMoEAdapter.title,
        MoEMoEAdapter,
        build_model=build_model,
        trainer=MoEMoETrainer,
        check_config=check_model_config,
        demo_runs=family_demo_runs(FAMILY),
    )
)
