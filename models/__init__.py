"""Model families, registered with timm on import: DAT / DAT++ (``dat_pp_*``, ``dat_plus_tiny``,
``dat_v1_*``), ViTAEv2-VSA (``vitaev2_vsa_*``) and DeBiFormer (``debiformer_*``). The package imports
nothing from the project root, so it can be copied into any project."""
from .build import BUILDERS, build_model, create_from_yaml, dat_kwargs
from .dat import DAT, RELEASED_FILES, VARIANTS, CheckpointMismatchError, checkpoint_filter_fn, load_pretrained
from .debiformer import DeBiFormer
from .vitaev2_vsa import ViTAEv2VSA

__all__ = ['BUILDERS', 'build_model', 'create_from_yaml', 'dat_kwargs', 'DAT', 'RELEASED_FILES', 'VARIANTS',
           'CheckpointMismatchError', 'checkpoint_filter_fn', 'load_pretrained', 'DeBiFormer', 'ViTAEv2VSA']
