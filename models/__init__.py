"""DAT / DAT++ models."""
from .build import build_model
from .dat import DAT

__all__ = ['build_model', 'DAT']
