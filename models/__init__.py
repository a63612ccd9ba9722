"""DAT / DAT++ models. Importing this package also registers the timm names (``models.registry``)."""
from . import registry  # noqa: F401  (registers dat_pp_*, dat_plus_tiny, dat_v1_*, dat_custom with timm)
from . import vitaev2_vsa  # noqa: F401  (registers vitaev2_vsa_* with timm)
from .build import build_model
from .dat import DAT
from .debiformer import DeBiFormer  # noqa: F401  (registers debiformer_tiny / _small / _base with timm)
from .vitaev2_vsa import ViTAEv2VSA

__all__ = ['build_model', 'DAT', 'DeBiFormer', 'ViTAEv2VSA']
