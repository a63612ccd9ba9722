"""One dataset-discovery rule for the root checks, the training set and the validation set:
hidden entries ignored, every real folder entered once (symlink loops and duplicates refused)."""
import os
from pathlib import Path

import pytest
from PIL import Image

from data import DataError
from data.discovery import class_folders, find_samples
from data.folder import SafeImageFolder, check_data_root


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (6, 4), (10, 200, 30)).save(path)


def _tree(root: Path, classes=('a', 'b', 'c'), per_class=2) -> Path:
    for split in ('train', 'val'):
        for c in classes:
            for i in range(per_class):
                _img(root / split / c / f'{i}.jpg')
    return root


def _classes_and_labels(split: Path):
    ds = SafeImageFolder(str(split))
    return ds.classes, sorted((os.path.relpath(p, split), t) for p, t in ds.samples)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path, split):
    root = _tree(tmp_path)
    _img(root / split / '.ipynb_checkpoints' / 'x.jpg')          # a hidden "class"
    _img(root / split / 'a' / '.ipynb_checkpoints' / 'y.jpg')    # a hidden sub-folder of a class
    _img(root / split / 'b' / '.hidden.jpg')
    _img(root / split / 'b' / '._0.jpg')                          # macOS resource fork
    check_data_root(str(root))                                    # train and val still agree
    classes, labels = _classes_and_labels(root / split)
    assert classes == ['a', 'b', 'c'] and class_folders(str(root / split)) == classes
    assert labels == [(f'{c}/{i}.jpg', k) for k, c in enumerate('abc') for i in range(2)]


def test_real_nested_folders_and_symlinked_class_folders_are_followed(tmp_path):
    root = _tree(tmp_path / 'data')
    _img(root / 'train' / 'a' / 'more' / '9.jpg')
    outside = tmp_path / 'elsewhere' / 'd'
    for i in range(3):
        _img(outside / f'{i}.jpg')
    (root / 'train' / 'd').symlink_to(outside, target_is_directory=True)
    (root / 'val' / 'd').symlink_to(outside, target_is_directory=True)   # another split: fine
    check_data_root(str(root))
    classes, labels = _classes_and_labels(root / 'train')
    assert classes == ['a', 'b', 'c', 'd']
    assert ('a/more/9.jpg', 0) in labels and [p for p, t in labels if t == 3] == ['d/0.jpg', 'd/1.jpg', 'd/2.jpg']


@pytest.mark.parametrize('link, target, words', [
    ('a/up', '..', ["'{split}/a/up' leads to '{split}'", 'already part of the split']),
    ('a/self', '.', ["'{split}/a/self' leads to '{split}/a'", 'already part of the split']),
    ('a/root', '../..', ["'{split}/a/root' leads to '{root}'", "which contains '{split}' itself"]),
    ('b/again', '../a', ["'{split}/b/again' leads to '{split}/a'", "(as '{split}/a')"]),
    ('e', 'a', ["'{split}/e' leads to '{split}/a'"]),                     # a second class, same images
])
def test_symlink_loops_and_duplicates_are_refused_in_one_line(tmp_path, link, target, words):
    root = _tree(tmp_path).resolve()
    split = root / 'train'
    (split / link).symlink_to(target, target_is_directory=True)
    with pytest.raises(DataError) as err:
        SafeImageFolder(str(split))
    msg = str(err.value)
    assert '\n' not in msg and 'remove or replace that link' in msg
    for word in words:
        assert word.format(split=split, root=root) in msg, msg


def test_dangling_links_and_unreadable_entries(tmp_path):
    root = _tree(tmp_path)
    (root / 'train' / 'ghost').symlink_to(tmp_path / 'missing', target_is_directory=True)
    (root / 'train' / 'a' / 'gone.jpg').symlink_to(tmp_path / 'missing.jpg')
    assert class_folders(str(root / 'train')) == ['a', 'b', 'c']          # not a class folder
    samples = find_samples(str(root / 'train'), {'a': 0})
    assert (str(root / 'train' / 'a' / 'gone.jpg'), 0) in samples          # reported when loaded
    ds = SafeImageFolder(str(root / 'train'))
    bad = [ds[i] for i in range(len(ds)) if ds.samples[i][0].endswith('gone.jpg')]
    assert bad and bad[0].__class__.__name__ == 'BadSample'
    with pytest.raises(DataError, match=r"cannot list '.*nowhere'"):
        class_folders(str(tmp_path / 'nowhere'))
