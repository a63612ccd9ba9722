"""The training step in process: no host sync per step (values are read when logging), and the
guard against resuming another model's run in the shared untagged folder."""
from __future__ import annotations

import logging
import traceback

import pytest
import torch

from config import ConfigError, load_config
from conftest import DEMO_CFG, EXACT_OPTS, TINY_DATA_OPTS, TINY_OPTS

HOST_READS = ('item', 'tolist', '__bool__', '__float__', '__int__')


def _trainer(tmp_path, data, *opts):
    from trainer import Trainer
    config = load_config(DEMO_CFG, [*TINY_OPTS, *EXACT_OPTS, *TINY_DATA_OPTS, 'DATA.DATA_PATH', data,
                                    'OUTPUT', str(tmp_path), *opts])
    trainer = Trainer(config, 0, 1, torch.device('cpu'), logging.getLogger('test_train_step'))
    trainer.build()
    return trainer


def test_an_epoch_reads_the_device_only_when_logging(tmp_path, tiny_data, monkeypatch):
    import trainer as trainer_module

    def fused_adamw(config, model):
        plain = build_optimizer(config, model)
        groups = [{k: v for k, v in g.items() if k != 'fused'} for g in plain.param_groups]
        return torch.optim.AdamW(groups, fused=True)     # the default on CUDA, here on the CPU

    build_optimizer = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, 'build_optimizer', fused_adamw)
    trainer = _trainer(tmp_path, tiny_data, 'PRINT_FREQ', '1000', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0',
                       'DATA.BATCH_SIZE', '4')
    assert trainer.optimizer.param_groups[0]['fused']
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            files = [frame.filename for frame in traceback.extract_stack()]
            # The CPU data pipeline reads its own tensors; the step must not read the device.
            if not any('torch/utils/data' in f for f in files):
                reads.append((_name, files[-2]))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    before = {k: v.clone() for k, v in trainer.model_without_ddp.state_dict().items()}
    trainer.loader_train.sampler.set_epoch(0)
    assert trainer.train_one_epoch(0, 0) is False
    monkeypatch.undo()
    steps = trainer.n_iter
    assert steps >= 5
    # Reads when the first and last steps log and for the epoch summary, however many steps ran.
    assert len(reads) <= 3, reads
    assert trainer.epoch_summary['skipped_steps'] == 0 and trainer.epoch_summary['train_loss'] > 0
    changed = [k for k, v in trainer.model_without_ddp.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_untagged_run_refuses_another_models_folder(tmp_path):
    from main import refuse_foreign_run
    folder = tmp_path / 'dat_demo' / 'default'
    folder.mkdir(parents=True)
    config = load_config(DEMO_CFG, ['OUTPUT', str(folder)])
    refuse_foreign_run(config)                                  # nothing there yet
    (folder / 'config.yaml').write_text(config.dump())
    refuse_foreign_run(config)                                  # the same model: resumes
    other = load_config(DEMO_CFG, ['OUTPUT', str(folder), 'MODEL.DAT.dims', '[8,16,32,64]'])
    with pytest.raises(ConfigError, match=r"another model \(MODEL.DAT.dims differs\).*--tag"):
        refuse_foreign_run(other)
    refuse_foreign_run(load_config(DEMO_CFG, ['OUTPUT', str(folder), 'TAG', 'mine',
                                              'MODEL.DAT.dims', '[8,16,32,64]']))   # tagged: its own run
