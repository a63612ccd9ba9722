"""Parameter counts of the shipped configs equal the official models' (dat_facts.md section 4)."""
from pathlib import Path

import pytest

from config import load_config
from models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

OFFICIAL_PARAMS = {
    'dat_tiny': 23_962_876,
    'dat_small': 53_127_366,
    'dat_base': 93_690_640,
    'dat_base_384': 93_690_640,
    'dat_p': 22_772_796,
}


@pytest.mark.parametrize('name,expected', sorted(OFFICIAL_PARAMS.items()))
def test_param_count(name: str, expected: int) -> None:
    model = build_model(load_config(str(CONFIGS / f'{name}.yaml')))
    assert sum(p.numel() for p in model.parameters()) == expected
