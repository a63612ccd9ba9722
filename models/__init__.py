"""DAT / DAT++ models. Importing this package registers the timm names (``dat_pp_*``, ``dat_plus_tiny``,
``dat_v1_*``); the package imports nothing from the project root, so it can be copied into any project."""
from .build import BUILDERS, build_model, create_from_yaml, dat_kwargs
from .dat import DAT, RELEASED_FILES, VARIANTS, CheckpointMismatchError, checkpoint_filter_fn, load_pretrained

__all__ = ['BUILDERS', 'build_model', 'create_from_yaml', 'dat_kwargs', 'DAT', 'RELEASED_FILES', 'VARIANTS',
           'CheckpointMismatchError', 'checkpoint_filter_fn', 'load_pretrained']
