"""Checkpoint files: safe reading, atomic writing, the run-folder lock, and the resume policy.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(path, map_location='cpu', weights_only=True)``: opening a checkpoint never runs
code from it. Writes are atomic (temp file, fsync, rename): a crash or a full disk leaves the
earlier checkpoints as they were. A file that does not load is told apart by cause: damaged
bytes (:class:`CheckpointCorrupt`, auto-resume falls back to an earlier file) or a file the
system would not let us read (:class:`CheckpointUnreadable`, the run stops and deletes nothing).

Every error is a :class:`CheckpointError` whose message is one line naming the file and the fix.
"""
# The underscored names are shared with utils.py and the tests.
from .files import (CheckpointCorrupt, CheckpointError, CheckpointUnreadable, OutputFolderError,  # noqa: F401
                    PickledConfig, _first_line, _list_names, _shape, atomic_save, load_checkpoint_file,
                    strip_prefixes, unwrap_model, unwrap_state_dict)
from .runs import BEST_NAME, LOCK_NAME, CheckpointManager, RunLock, find_resume, prepare_output_dir
from .resume import (check_optimizer, choose_eval_file, choose_resume_file, load_optimizer_state, rank_rng_state,
                     restore_schedule, resume_position, saved_img_size, schedule_changes, set_aside_best)
from .weights import (_mismatch_message, check_model_config, check_tensors, load_model_state,  # noqa: F401
                      model_config, saved_model_config)

__all__ = [
    'CheckpointError', 'CheckpointCorrupt', 'CheckpointUnreadable', 'OutputFolderError',
    'atomic_save', 'load_checkpoint_file', 'unwrap_state_dict', 'strip_prefixes', 'unwrap_model',
    'load_model_state', 'check_tensors', 'model_config', 'saved_model_config', 'check_model_config',
    'choose_resume_file', 'choose_eval_file', 'check_optimizer', 'load_optimizer_state', 'restore_schedule',
    'resume_position', 'rank_rng_state', 'saved_img_size', 'schedule_changes', 'set_aside_best', 'CheckpointManager', 'find_resume', 'RunLock', 'prepare_output_dir',
    'BEST_NAME', 'LOCK_NAME',
]
