"""Checkpoint files: atomic writes, pruning, resume discovery, safe loading, pretrained resizing, RNG."""
import argparse
import contextlib
import errno
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from checkpoint import (CheckpointError, CheckpointManager, atomic_save, find_resume,  # noqa: E402
                        load_checkpoint_file, load_model_state, unwrap_state_dict)
from conftest import fixture_dir  # noqa: E402
from utils import get_rng_state, load_pretrained, set_rng_state  # noqa: E402

LOG = logging.getLogger('test_checkpoint')


def _one_line(err):
    text = str(err)
    assert '\n' not in text, text
    return text


# ----------------------------------------------------------------------------- atomic_save
def test_atomic_save_round_trips_with_weights_only(tmp_path):
    path = str(tmp_path / 'a.pth')
    state = {'model': {'w': torch.arange(6.).reshape(2, 3)}, 'epoch': 3, 'config': 'MODEL:\n  NAME: x\n',
             'betas': (0.9, 0.999), 'none': None, 'flags': [True, False]}
    atomic_save(state, path)
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    assert torch.equal(loaded['model']['w'], state['model']['w'])
    assert {k: v for k, v in loaded.items() if k != 'model'} == {k: v for k, v in state.items() if k != 'model'}


@contextlib.contextmanager
def _file_size_limit(limit):
    """A real kernel limit on file size: writes past ``limit`` bytes fail with EFBIG, as the writes
    of a full disk fail with ENOSPC (SIGXFSZ ignored, as a process that handles it would)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_write_failing_inside_torch_save_is_one_line_and_keeps_previous_file(tmp_path):
    # torch.save turns the failed write into "RuntimeError: [enforce fail at inline_container.cc]
    # unexpected pos": the OSError behind it must still be the one reported.
    path = str(tmp_path / 'ckpt_epoch_1.pth')
    atomic_save({'epoch': 1, 'w': torch.ones(3)}, path)
    before = open(path, 'rb').read()
    with _file_size_limit(64 << 10):
        with pytest.raises(CheckpointError) as info:
            atomic_save({'epoch': 2, 'w': torch.zeros(1 << 16)}, path)
    message = _one_line(info.value)
    assert path in message and os.strerror(errno.EFBIG) in message, message
    assert 'earlier checkpoints kept' in message and 'ulimit -f' in message
    assert 'inline_container' not in message
    assert os.listdir(tmp_path) == ['ckpt_epoch_1.pth']
    assert open(path, 'rb').read() == before


@pytest.mark.parametrize('failure', [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     RuntimeError('zip writer: something else went wrong')])
def test_any_write_failure_is_one_line_and_removes_temp(tmp_path, monkeypatch, failure):
    path = str(tmp_path / 'ckpt_epoch_1.pth')

    def failing(obj, f):
        f.write(b'\0' * 4096)
        raise failure
    monkeypatch.setattr(torch, 'save', failing)
    with pytest.raises(CheckpointError) as info:
        atomic_save({'epoch': 2}, path)
    message = _one_line(info.value)
    assert message.startswith(f'could not write checkpoint {path}: ') and 'earlier checkpoints kept' in message
    assert os.listdir(tmp_path) == []


def test_interrupted_write_removes_temp_file(tmp_path, monkeypatch):
    def interrupted(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({'a': 1}, str(tmp_path / 'x.pth'))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('bad, where', [
    ({'config': argparse.Namespace(lr=1)}, "['config']"),
    ({'max_accuracy': np.float64(80.0)}, "['max_accuracy']"),
])
def test_values_weights_only_cannot_load_are_refused_before_writing(tmp_path, bad, where):
    with pytest.raises(CheckpointError, match='plain') as info:
        atomic_save(bad, str(tmp_path / 'x.pth'))
    assert where in _one_line(info.value)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- loading files
def test_missing_file_names_path_and_fix(tmp_path):
    path = str(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = _one_line(info.value)
    assert 'not found' in message and path in message and '--resume' in message


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_damaged_file_is_reported_as_corrupt(tmp_path, damage):
    path = str(tmp_path / 'c.pth')
    atomic_save({'w': torch.randn(1000)}, path)
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write({'truncate': data[:len(data) // 2], 'garbage': b'not a checkpoint\n', 'empty': b''}[damage])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = _one_line(info.value)
    assert 'truncated or corrupt' in message and path in message


def _unsafe_file(tmp_path):
    path = str(tmp_path / 'official.pth')
    weights = {'cls_head.weight': torch.randn(3, 4), 'cls_head.bias': torch.randn(3)}
    torch.save({'model': weights, 'args': argparse.Namespace(lr=0.1), 'epoch': 5}, path)
    return path, weights


def test_unsafe_pickle_is_refused_with_the_convert_command(tmp_path):
    path, _ = _unsafe_file(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = _one_line(info.value)
    assert 'refused' in message and 'safety' in message and 'argparse.Namespace' in message
    assert 'tools/convert_checkpoint.py' in message


@pytest.mark.slow
def test_convert_tool_recovers_weights_of_a_refused_file(tmp_path):
    path, weights = _unsafe_file(tmp_path)
    out = str(tmp_path / 'converted.pth')
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'convert_checkpoint.py'),
                          '--in', path, '--out', out], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    converted = load_checkpoint_file(out)
    assert set(converted) == {'model'}
    assert all(torch.equal(converted['model'][k], v) for k, v in weights.items())


def test_unwrap_state_dict_accepts_common_layouts():
    sd = {'a.weight': torch.ones(2)}
    assert unwrap_state_dict({'model': sd, 'optimizer': {'state': {}}, 'lr_scheduler': {}, 'epoch': 1}) is sd
    assert unwrap_state_dict({'model': sd}) is sd
    assert unwrap_state_dict({'state_dict': sd}) is sd
    assert unwrap_state_dict(sd) is sd
    with pytest.raises(CheckpointError, match="'model'"):
        unwrap_state_dict({'epoch': 3, 'optimizer': {}})


# ----------------------------------------------------------------------------- CheckpointManager
def _state(tag):
    return {'model': {'w': torch.full((2,), float(tag))}}


def _names(directory):
    return sorted(os.listdir(directory))


def test_manager_prunes_to_keep_last_and_keeps_best(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2, logger=LOG)
    manager.save(_state(0), epoch=0)
    manager.save(_state(1), epoch=1, is_best=True)
    manager.save(_state(2.1), epoch=2, iteration=10)
    manager.save(_state(2.2), epoch=2, iteration=20)
    assert 'ckpt_epoch_2_iter_10.pth' in _names(tmp_path)
    manager.save(_state(2), epoch=2)
    manager.save(_state(3), epoch=3, is_best=True)
    last = manager.save(_state(4.1), epoch=4, iteration=5)
    assert _names(tmp_path) == ['best.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'ckpt_epoch_4_iter_5.pth']
    best = load_checkpoint_file(str(tmp_path / 'best.pth'))
    assert best['epoch'] == 3 and best['iteration'] is None and torch.equal(best['model']['w'], torch.full((2,), 3.))
    assert manager.latest() == last == str(tmp_path / 'ckpt_epoch_4_iter_5.pth')
    mid = load_checkpoint_file(last)
    assert (mid['epoch'], mid['iteration']) == (4, 5)


def test_saving_behind_newer_files_removes_the_abandoned_ones(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path), keep_last=5, logger=LOG)
    for epoch in range(4):
        manager.save(_state(epoch), epoch=epoch)
    manager.save(_state(4.5), epoch=4, iteration=50)
    # resumed by hand from epoch 1: the run continues from there, epochs 2..4 belong to the old run
    with caplog.at_level(logging.WARNING, logger='test_checkpoint'):
        manager.save(_state(2), epoch=2)
    assert _names(tmp_path) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_2.pth']
    assert 'ckpt_epoch_3.pth' in caplog.text and 'ahead' in caplog.text
    assert torch.equal(load_checkpoint_file(manager.latest())['model']['w'], torch.full((2,), 2.))


def _truncate(path):
    data = open(path, 'rb').read()
    os.remove(path)      # a new file: best.pth may share the old one's data (hard link)
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def test_latest_skips_truncated_newest_with_warning(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path), keep_last=3, logger=LOG)
    for epoch in range(3):
        manager.save(_state(epoch), epoch=epoch)
    _truncate(str(tmp_path / 'ckpt_epoch_2.pth'))
    with caplog.at_level(logging.WARNING, logger='test_checkpoint'):
        found = find_resume(str(tmp_path), logger=LOG)
    assert found == str(tmp_path / 'ckpt_epoch_1.pth')
    assert 'ckpt_epoch_2.pth' in caplog.text and 'truncated or corrupt' in caplog.text


def test_latest_falls_back_to_best_copy_of_the_newest_epoch(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=3, logger=LOG)
    manager.save(_state(0), epoch=0)
    manager.save(_state(1), epoch=1, is_best=True)
    _truncate(str(tmp_path / 'ckpt_epoch_1.pth'))
    assert manager.latest() == str(tmp_path / 'best.pth')
    # but a newer intact checkpoint wins over best
    manager.save(_state(1.5), epoch=2, iteration=3)
    assert manager.latest() == str(tmp_path / 'ckpt_epoch_2_iter_3.pth')


def test_latest_ignores_best_from_an_abandoned_run(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path), keep_last=3, logger=LOG)
    for epoch in range(4):
        manager.save(_state(epoch), epoch=epoch, is_best=epoch == 3)
    manager.save(_state(1), epoch=1)           # resumed by hand from epoch 0: epochs 2, 3 are dropped
    with caplog.at_level(logging.WARNING, logger='test_checkpoint'):
        assert manager.latest() == str(tmp_path / 'ckpt_epoch_1.pth')
    assert 'ignoring' in caplog.text and 'best.pth' in caplog.text


def test_latest_of_empty_or_missing_dir_is_none(tmp_path):
    assert find_resume(str(tmp_path)) is None
    assert find_resume(str(tmp_path / 'not_there')) is None


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', ''])
    proc.wait()
    return proc.pid


def test_manager_removes_only_temp_files_of_dead_or_own_writers(tmp_path):
    from checkpoint.files import _HOST
    dead = tmp_path / f'.ckpt_epoch_3.pth.{_HOST}.{_dead_pid()}.abcd.tmp'
    old_style = tmp_path / f'.ckpt_epoch_2.pth.{_dead_pid()}.abcd.tmp'       # written before the host part
    own = tmp_path / f'.best.pth.{_HOST}.{os.getpid()}.12ef.tmp'
    live = tmp_path / f'.ckpt_epoch_3.pth.{_HOST}.{os.getppid()}.abcd.tmp'   # a writer that still runs
    elsewhere = tmp_path / f'.ckpt_epoch_3.pth.otherhost.{_dead_pid()}.abcd.tmp'   # cannot be checked
    other = tmp_path / 'notes.tmp'
    for p in (dead, old_style, own, live, elsewhere, other):
        p.write_bytes(b'partial')
    manager = CheckpointManager(str(tmp_path), logger=LOG)
    assert manager.latest() is None and dead.exists()        # looking never deletes
    manager.save(_state(0), epoch=0)
    assert _names(tmp_path) == sorted([live.name, elsewhere.name, 'ckpt_epoch_0.pth', 'notes.tmp'])


# ----------------------------------------------------------------------------- load_model_state
class Small(nn.Module):
    def __init__(self, width=4, extra_layers=0):
        super().__init__()
        self.fc = nn.Linear(width, 3)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(extra_layers)])


def test_load_model_state_strips_wrapper_prefixes():
    source, target = Small(), Small()
    sd = {'module._orig_mod.' + k: v for k, v in source.state_dict().items()}
    load_model_state(target, sd)
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_load_model_state_mismatch_lists_names_and_shapes():
    sd = Small(width=5, extra_layers=0).state_dict()
    sd['stray.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_model_state(Small(width=4, extra_layers=6), sd)
    message = _one_line(info.value)
    assert 'different architecture or config' in message
    assert 'fc.weight checkpoint (3, 5) vs model (3, 4)' in message
    assert '1 unexpected: stray.weight' in message
    assert '12 missing: blocks.0.weight' in message and '... and 4 more' in message   # 8 shown of 12


# ----------------------------------------------------------------------------- load_pretrained
class _Deform(nn.Module):
    def __init__(self, fmap):
        super().__init__()
        self.proj_q = nn.Conv2d(4, 4, 1)
        self.rpe_table = nn.Parameter(torch.randn(2, 2 * fmap - 1, 2 * fmap - 1))


class _Window(nn.Module):
    def __init__(self, window, fmap):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, 2))
        self.register_buffer('relative_position_index', torch.arange(window ** 4).reshape(window ** 2, -1))
        self.register_buffer('attn_mask', torch.full(((fmap // window) ** 2, 1), float(fmap)))


class MiniDat(nn.Module):
    def __init__(self, fmap=12, window=7, classes=5):
        super().__init__()
        self.stages = nn.ModuleList([nn.ModuleDict({'attns': nn.ModuleList([_Window(window, fmap),
                                                                            _Deform(fmap)])})])
        self.cls_head = nn.Linear(4, classes)


def _pretrained_config(path, map_file=''):
    return load_config(opts=['MODEL.PRETRAINED', path, 'MODEL.MAP_22K_TO_1K', map_file])


def _expected_table_resize(table, side):
    """Per-head loop, written independently of utils: ((2w-1)^2, heads) table -> side x side."""
    old = int(round(table.shape[0] ** 0.5))
    cols = []
    for h in range(table.shape[1]):
        image = table[:, h].reshape(1, 1, old, old)
        cols.append(F.interpolate(image, size=(side, side), mode='bicubic', align_corners=False).flatten())
    return torch.stack(cols, dim=1)


def test_load_pretrained_resizes_tables_and_keeps_resolution_buffers(tmp_path):
    source = MiniDat(fmap=8, window=4, classes=5)       # rpe 15x15, bias table 7x7
    path = str(tmp_path / 'pre.pth')
    atomic_save({'model': source.state_dict(), 'optimizer': {}, 'epoch': 299}, path)
    target = MiniDat(fmap=12, window=7, classes=5)      # rpe 23x23, bias table 13x13
    own_index = target.stages[0]['attns'][0].relative_position_index.clone()
    own_mask = target.stages[0]['attns'][0].attn_mask.clone()
    load_pretrained(_pretrained_config(path), target, LOG)

    src_rpe, rpe = source.stages[0]['attns'][1].rpe_table, target.stages[0]['attns'][1].rpe_table
    assert rpe.shape == (2, 23, 23)
    expected = F.interpolate(src_rpe.detach()[None], size=(23, 23), mode='bicubic', align_corners=False)[0]
    assert torch.allclose(rpe, expected)
    assert torch.allclose(rpe[:, 11, 11], src_rpe[:, 7, 7], atol=1e-6)   # zero displacement stays centred
    table = target.stages[0]['attns'][0].relative_position_bias_table
    assert torch.allclose(table, _expected_table_resize(
        source.stages[0]['attns'][0].relative_position_bias_table.detach(), 13))
    assert torch.equal(target.stages[0]['attns'][0].relative_position_index, own_index)
    assert torch.equal(target.stages[0]['attns'][0].attn_mask, own_mask)
    assert torch.equal(target.cls_head.weight, source.cls_head.weight)
    assert torch.equal(target.stages[0]['attns'][1].proj_q.weight, source.stages[0]['attns'][1].proj_q.weight)


@pytest.mark.parametrize('as_tensor', [False, True])
def test_load_pretrained_maps_22k_head_rows_with_index_file(tmp_path, as_tensor):
    source = MiniDat(fmap=12, classes=30)
    path = str(tmp_path / 'pre22k.pth')
    atomic_save({'model': source.state_dict()}, path)
    rows = [29, 3, 17, 0, 8]
    map_file = str(tmp_path / ('map.pth' if as_tensor else 'map.txt'))
    if as_tensor:
        torch.save(torch.tensor(rows), map_file)
    else:
        with open(map_file, 'w') as f:
            f.write(''.join(f'{r}\n' for r in rows))
    target = MiniDat(fmap=12, classes=5)
    load_pretrained(_pretrained_config(path, map_file), target, LOG)
    assert torch.equal(target.cls_head.weight, source.cls_head.weight[rows])
    assert torch.equal(target.cls_head.bias, source.cls_head.bias[rows])


def test_load_pretrained_without_map_trains_a_fresh_head(tmp_path, caplog):
    path = str(tmp_path / 'pre.pth')
    atomic_save({'model': MiniDat(classes=30).state_dict()}, path)
    target = MiniDat(classes=5)
    fresh = target.cls_head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger='test_checkpoint'):
        load_pretrained(_pretrained_config(path), target, LOG)
    assert torch.equal(target.cls_head.weight, fresh)
    assert 'fresh' in caplog.text and '30 classes' in caplog.text


def test_load_pretrained_other_family_through_its_filter_with_a_fresh_head(tmp_path, caplog):
    """MODEL.TYPE timm: the backbone loads, a classifier for other classes stays the model's own."""
    from models import build_model
    opts = ['MODEL.TYPE', 'timm', 'MODEL.TIMM.NAME', 'resnet10t', 'MODEL.TIMM.DROP_PATH_RATE', 'None']
    source = build_model(load_config(opts=opts + ['MODEL.NUM_CLASSES', '10']))
    path = str(tmp_path / 'pre.pth')
    atomic_save({'model': source.state_dict()}, path)
    config = load_config(opts=opts + ['MODEL.NUM_CLASSES', '3', 'MODEL.PRETRAINED', path])
    target = build_model(config)
    fresh = target.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger='test_checkpoint'):
        load_pretrained(config, target, LOG)
    assert torch.equal(target.fc.weight, fresh) and 'head not loaded' in caplog.text
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith('layer4.')}
    atomic_save({'model': partial}, path)
    with pytest.raises(CheckpointError, match='does not fit the model') as info:
        load_pretrained(config, build_model(config), LOG)
    assert 'layer4.' in _one_line(info.value)


def test_load_pretrained_bad_map_file_is_explained(tmp_path):
    path = str(tmp_path / 'pre.pth')
    atomic_save({'model': MiniDat(classes=30).state_dict()}, path)
    map_file = tmp_path / 'map.txt'
    map_file.write_text('1\n2\n40\n')
    with pytest.raises(CheckpointError, match=r"class map holds 3 indices .* needs 5 .* below 30") as info:
        load_pretrained(_pretrained_config(path, str(map_file)), MiniDat(classes=5), LOG)
    _one_line(info.value)


def test_load_pretrained_refuses_to_leave_backbone_weights_unloaded(tmp_path):
    sd = MiniDat().state_dict()
    del sd['stages.0.attns.1.proj_q.weight']
    path = str(tmp_path / 'partial.pth')
    atomic_save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(_pretrained_config(path), MiniDat(), LOG)
    message = _one_line(info.value)
    assert '1 missing: stages.0.attns.1.proj_q.weight' in message


def test_load_pretrained_on_real_model_at_higher_resolution(tmp_path):
    """Official mini_pp weights (64 px, rpe 15x15 at stage 1) fine-tuned at 96 px (rpe 23x23)."""
    import models
    folder = fixture_dir('dat_official')
    sd = torch.load(folder / 'mini_pp.pt', map_location='cpu', weights_only=True)['state_dict']
    path = str(tmp_path / 'mini_pp.pth')
    atomic_save({'model': sd}, path)
    config = load_config(str(folder / 'mini_pp.yaml'),
                         opts=['MODEL.DAT.img_size', '96', 'DATA.IMG_SIZE', '96', 'MODEL.PRETRAINED', path])
    model = models.build_model(config).double()
    load_pretrained(config, model, LOG)
    own = model.state_dict()
    assert sd['stages.1.attns.1.rpe_table'].shape[-1] == 15 and own['stages.1.attns.1.rpe_table'].shape[-1] == 23
    for name, value in sd.items():
        if own[name].shape == value.shape and not name.endswith(('relative_position_index', 'attn_mask')):
            assert torch.equal(own[name], value), name
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 96, 96, dtype=torch.float64))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- RNG state
def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)            # leaves a cached Gaussian inside python's state
    np.random.randn()
    path = str(tmp_path / 'rng.pth')
    atomic_save({'rng': get_rng_state()}, path)
    expected = _draw()
    _draw()                       # move every generator on
    set_rng_state(load_checkpoint_file(path)['rng'])
    assert _draw() == expected


class _RunsCode:
    """Unpickling this calls os.getcwd: stands in for any code a hostile pickle could run."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_official_training_checkpoint_with_yacs_config_loads(tmp_path):
    """Official (Swin-style) training checkpoints pickle the yacs config: read them without running code."""
    from config import load_config
    path = tmp_path / 'official_full.pth'
    torch.save({'model': {'w': torch.arange(3.)}, 'config': load_config(), 'epoch': 299, 'max_accuracy': 83.9}, path)
    ckpt = load_checkpoint_file(str(path))
    assert torch.equal(ckpt['model']['w'], torch.arange(3.)) and ckpt['epoch'] == 299
    assert ckpt['config']['MODEL']['TYPE'] == 'dat' and type(ckpt['config']).__name__ == 'PickledConfig'


def test_yacs_config_does_not_open_the_door_to_other_objects(tmp_path):
    from config import load_config
    path = tmp_path / 'hostile.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'config': load_config(), 'payload': _RunsCode()}, path)
    with pytest.raises(CheckpointError, match='refused'):
        load_checkpoint_file(str(path))


# ----------------------------------------------------------------------------- unreadable vs corrupt
def test_unreadable_newest_checkpoint_stops_the_search_and_deletes_nothing(tmp_path):
    from checkpoint import CheckpointUnreadable
    manager = CheckpointManager(str(tmp_path), keep_last=3, logger=LOG)
    for epoch in range(2):
        manager.save(_state(epoch), epoch=epoch)
    (tmp_path / 'ckpt_epoch_2.pth').mkdir()                  # open() fails with EISDIR: not damage
    with pytest.raises(CheckpointUnreadable) as info:
        manager.latest()
    message = _one_line(info.value)
    assert str(tmp_path / 'ckpt_epoch_2.pth') in message and 'nothing was deleted' in message
    assert _names(tmp_path) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_2.pth']


def test_fifo_is_unreadable_without_blocking(tmp_path):
    from checkpoint import CheckpointUnreadable
    fifo = tmp_path / 'ckpt_epoch_0.pth'
    os.mkfifo(fifo)
    with pytest.raises(CheckpointUnreadable, match='not a regular file'):
        load_checkpoint_file(str(fifo))


def test_saving_behind_a_corrupt_newer_file_keeps_it(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=5, logger=LOG)
    for epoch in range(3):
        manager.save(_state(epoch), epoch=epoch)
    _truncate(str(tmp_path / 'ckpt_epoch_2.pth'))
    assert manager.latest() == str(tmp_path / 'ckpt_epoch_1.pth')
    manager.save(_state(1.5), epoch=2, iteration=4)             # the resumed run goes on from epoch 1
    assert 'ckpt_epoch_2.pth' in _names(tmp_path)


# ----------------------------------------------------------------------------- run lock
def test_run_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from checkpoint import LOCK_NAME, RunLock
    first = RunLock(str(tmp_path)).acquire()
    assert RunLock(str(tmp_path)).acquire().held            # the same process: already its own
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info['pid'] == os.getpid() and info['host']
    first.release()
    assert not RunLock(str(tmp_path)).held


def test_run_lock_of_a_killed_process_does_not_block(tmp_path):
    from checkpoint import RunLock
    holder = subprocess.Popen([sys.executable, '-c', (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / '.run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'{\"pid\": %d, \"host\": \"h\", \"started\": \"then\"}' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(CheckpointError) as info:
            RunLock(str(tmp_path)).acquire()
        message = _one_line(info.value)
        assert f'in use by another run (pid {holder.pid} on host h, started then)' in message and '--tag' in message
    finally:
        holder.kill()
        holder.wait()
    RunLock(str(tmp_path)).acquire().release()      # the kernel dropped the dead holder's lock


# ----------------------------------------------------------------------------- tensors and model config
def test_non_float_and_non_finite_tensors_are_refused():
    good = Small().state_dict()
    for bad, words in [({**good, 'fc.weight': good['fc.weight'].long()}, 'torch.int64 (model torch.float32)'),
                       ({**good, 'fc.weight': good['fc.weight'].to(torch.complex64)}, 'complex64'),
                       ({**good, 'fc.bias': torch.tensor([0., float('nan'), 1.])}, 'NaN or inf values in 1 tensors: fc.bias'),
                       ({**good, 'fc.bias': torch.tensor([0., float('inf'), 1.])}, 'NaN or inf')]:
        target = Small()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(CheckpointError) as info:
            load_model_state(target, bad, source='checkpoint x.pth')
        message = _one_line(info.value)
        assert words in message and message.startswith('checkpoint x.pth has')
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())   # nothing loaded
    load_model_state(Small(), {k: v.half() for k, v in good.items()})    # another float precision is fine


def _cfg(*opts):
    return load_config(opts=list(opts))


def test_model_config_mismatch_in_arithmetic_is_refused():
    from checkpoint import check_model_config, model_config
    saved = {'model_config': model_config(_cfg('MODEL.DAT.deform_arith', 'v1'))}
    with pytest.raises(CheckpointError) as info:
        check_model_config(saved, _cfg(), 'checkpoint a.pth')
    message = _one_line(info.value)
    assert "MODEL.DAT.deform_arith 'v1' in the checkpoint, 'pp' here" in message
    assert '--opts MODEL.DAT.deform_arith v1' in message
    spec = {'model_config': model_config(_cfg('MODEL.DAT.stage_spec', "[['L','S'],['L','D'],['L','D','L','D','L','D'],['L','D']]"))}
    with pytest.raises(CheckpointError, match='MODEL.DAT.stage_spec'):
        check_model_config(spec, _cfg(), 'checkpoint a.pth')
    # regularisation, the class count and the input size do not change the arithmetic
    check_model_config({'model_config': model_config(_cfg('MODEL.DAT.drop_path_rate', '0.3', 'MODEL.DAT.img_size', '384',
                                                           'MODEL.DAT.num_classes', '10'))},
                       _cfg(), 'x')
    check_model_config({'model': {}}, _cfg(), 'x')           # a release file without a config: nothing to compare


def test_model_config_is_read_from_yaml_dump_and_official_pickled_config():
    from checkpoint import PickledConfig, check_model_config
    v1 = _cfg('MODEL.DAT.deform_arith', 'v1')
    with pytest.raises(CheckpointError, match='deform_arith'):
        check_model_config({'config': v1.dump()}, _cfg(), 'x')
    official = PickledConfig(MODEL=PickledConfig(TYPE='dat', DAT=PickledConfig(ksizes=(9, 7, 5, 3), nat_ksizes=[7] * 4)))
    with pytest.raises(CheckpointError, match=r"MODEL.DAT.nat_ksizes \[7, 7, 7, 7\] in the checkpoint, \[3, 3, 3, 3\] here"):
        check_model_config({'config': official}, _cfg(), 'x')
    official['MODEL']['DAT']['nat_ksizes'] = [3] * 4           # keys it lacks (deform_arith) are not compared
    check_model_config({'config': official}, _cfg(), 'x')


def test_another_optimizer_is_refused_with_the_pretrained_hint():
    from checkpoint import check_optimizer
    params = [nn.Parameter(torch.ones(2))]
    adamw = torch.optim.AdamW(params)
    saved = {'optimizer': adamw.state_dict(), 'optimizer_name': 'AdamW'}
    check_optimizer(saved, torch.optim.AdamW(params), 'a.pth')
    with pytest.raises(CheckpointError) as info:
        check_optimizer(saved, torch.optim.SGD(params, lr=0.1), 'a.pth')
    message = _one_line(info.value)
    assert 'optimizer AdamW, this run uses SGD' in message and '--pretrained a.pth' in message
    with pytest.raises(CheckpointError, match='--pretrained'):          # files without the name: settings differ
        check_optimizer({'optimizer': adamw.state_dict()}, torch.optim.SGD(params, lr=0.1), 'a.pth')


# ----------------------------------------------------------------------------- resume position
def _consumed(n, epoch, batches, batch_size, world):
    """Indices of the first ``batches`` batches of every rank, from the training sampler itself."""
    from data.samplers import ResumableDistributedSampler
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(range(n), num_replicas=world, rank=rank, seed=7, batch_size=batch_size)
        sampler.set_epoch(epoch)
        out += sampler.epoch_indices()[:batches * batch_size]
    return sorted(out)


@pytest.mark.parametrize('old, new, repeated', [((2, 1), (4, 1), 0), ((2, 2), (4, 1), 0), ((4, 1), (2, 2), 0),
                                                ((2, 1), (3, 1), 2), ((3, 2), (5, 1), 4)])
def test_resume_keeps_the_position_in_images_across_batch_and_world_size(old, new, repeated):
    from checkpoint import resume_position
    (b, w), (nb, nw) = old, new
    n, done = 96, 4
    ckpt = {'epoch': 1, 'iteration': done, 'samples_seen': done * b * w}
    epoch, batch, again = resume_position(ckpt, iters_per_epoch=n // (nb * nw), global_batch=nb * nw)
    assert (epoch, again) == (1, repeated)
    seen, resumed = _consumed(n, 1, done, b, w), _consumed(n, 1, batch, nb, nw)
    assert set(resumed) <= set(seen) and len(seen) - len(resumed) == repeated      # nothing skipped


def test_resume_position_of_epoch_ends_and_official_files():
    from checkpoint import resume_position
    assert resume_position({'epoch': 3, 'iteration': None}, 10, 8) == (4, 0, 0)
    assert resume_position({'epoch': 299}, 10, 8) == (300, 0, 0)
    assert resume_position({'epoch': 3, 'iteration': 12, 'samples_seen': 96}, 10, 8) == (3, 10, 0)   # past the end
    assert resume_position({'epoch': 3, 'iteration': 5}, 10, 8) == (3, 5, 0)        # files without samples_seen
    assert resume_position({'epoch': 3, 'iteration': 5, 'samples_seen': -1}, 10, 8) == (3, 5, 0)


# ----------------------------------------------------------------------------- output folder
def test_output_folder_problems_are_one_line(tmp_path):
    from checkpoint import OutputFolderError, prepare_output_dir
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    for path, words in [(a_file, 'exists and is not a folder'), (a_file / 'sub', 'cannot create output folder'),
                        ('/proc/dat_output/run', 'cannot create output folder')]:
        with pytest.raises(OutputFolderError) as info:
            prepare_output_dir(str(path))
        assert words in _one_line(info.value)
    assert prepare_output_dir(str(tmp_path / 'new' / 'run')) and os.listdir(tmp_path / 'new' / 'run') == []


# ----------------------------------------------------------------------------- Trainer.save
def test_failed_save_closes_tensorboard_quietly_and_reports_the_write_error(tmp_path):
    """On a full disk TensorBoard's own flush fails too; that second error must not replace the first."""
    from progress import Progress
    from trainer import Trainer

    class FullDisk:
        def save(self, *args, **kwargs):
            raise CheckpointError('could not write checkpoint x.pth: No space left on device')

    class BrokenWriter:
        closed = False

        def close(self):
            BrokenWriter.closed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer = Trainer.__new__(Trainer)
    trainer.rank, trainer.world_size, trainer.manager = 0, 1, FullDisk()
    trainer.config = load_config(opts=['DATA.BATCH_SIZE', '2'])
    trainer.progress = Progress.__new__(Progress)
    trainer.progress.tb_writer, trainer.progress.logger = BrokenWriter(), logging.getLogger('test')
    trainer._checkpoint_state = lambda: {}
    with pytest.raises(CheckpointError, match='No space left on device'):
        trainer.save(epoch=1, iteration=3)
    assert BrokenWriter.closed and trainer.progress.tb_writer is None  # the loop's `finally` has nothing left
    trainer.progress.close()


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys):
    pytest.importorskip('safetensors')
    from tools.export_safetensors import main as export_main
    ckpt = tmp_path / 'ckpt.pth'
    atomic_save({'model': {'w': torch.randn(1 << 16)}}, str(ckpt))
    out = tmp_path / 'out' / 'w.safetensors'
    with _file_size_limit(64 << 10):
        assert export_main(['--ckpt', str(ckpt), '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'could not write checkpoint {out}: File too large' in err
    assert os.listdir(tmp_path / 'out') == []


def test_load_pretrained_refuses_non_finite_and_other_arithmetic(tmp_path):
    from checkpoint import model_config
    sd = MiniDat().state_dict()
    sd['cls_head.bias'][1] = float('inf')
    path = str(tmp_path / 'inf.pth')
    atomic_save({'model': sd}, path)
    with pytest.raises(CheckpointError, match=r'pretrained checkpoint .*inf.pth has NaN or inf values in 1 tensors: cls_head.bias'):
        load_pretrained(_pretrained_config(path), MiniDat(), LOG)
    v1 = str(tmp_path / 'v1.pth')
    atomic_save({'model': MiniDat().state_dict(), 'model_config': model_config(_cfg('MODEL.DAT.deform_arith', 'v1'))}, v1)
    with pytest.raises(CheckpointError, match="deform_arith 'v1' in the checkpoint, 'pp' here"):
        load_pretrained(_pretrained_config(v1), MiniDat(), LOG)
