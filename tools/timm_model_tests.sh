#!/usr/bin/env bash
# Run timm's own model test suite (tests/test_models.py of the installed timm version) on this
# project's names: DAT / DAT++, ViTAEv2-VSA and DeBiFormer.
#
#   bash tools/timm_model_tests.sh                 # every DAT test
#   bash tools/timm_model_tests.sh -m "not fxbackward" -x    # extra pytest arguments
#
# The suite comes from timm's source distribution (pip download, kept in $TIMM_TESTS_CACHE,
# default ~/.cache/dat_timm_tests). Its FEAT_INTER_FILTERS list names the modules whose models
# support forward_intermediates; this project's model modules ('dat', 'vitaev2_vsa', 'debiformer')
# are added to it. `-p models` imports this package as a pytest plugin, which registers the names
# before the suite collects them. Tests are selected by model name (DAT_TIMM_NAMES, a -k
# expression); DAT's TorchScript tests are left out (see README: DAT is not scriptable).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CACHE="${TIMM_TESTS_CACHE:-$HOME/.cache/dat_timm_tests}"
NAMES="${DAT_TIMM_NAMES:-(dat_pp_ or dat_plus_ or dat_v1_) and not torchscript or vitaev2_vsa_ or debiformer_}"
VERSION="$("$PYTHON" -c 'import timm; print(timm.__version__)')"
SRC="$CACHE/timm-$VERSION"
if [ ! -f "$SRC/tests/test_models.py" ]; then
    mkdir -p "$CACHE"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "timm==$VERSION" -d "$CACHE"
    tar -xzf "$CACHE/timm-$VERSION.tar.gz" -C "$CACHE" "timm-$VERSION/tests" "timm-$VERSION/pyproject.toml"
fi
# A working copy of the suite with 'dat' in FEAT_INTER_FILTERS (the upstream files stay untouched).
WORK="$CACHE/run-$VERSION"
rm -rf "$WORK" && mkdir -p "$WORK"
cp -r "$SRC/tests" "$WORK/tests"
cp "$SRC/pyproject.toml" "$WORK/pyproject.toml"
sed -i "s/^FEAT_INTER_FILTERS = \[/FEAT_INTER_FILTERS = ['dat', 'vitaev2_vsa', 'debiformer', /" "$WORK/tests/test_models.py"
grep -q "^FEAT_INTER_FILTERS = \['dat', 'vitaev2_vsa', 'debiformer', " "$WORK/tests/test_models.py" \
    || { echo "timm $VERSION: FEAT_INTER_FILTERS not found in tests/test_models.py; update this script" >&2; exit 2; }
cd "$WORK"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m pytest tests/test_models.py -p models \
    -k "$NAMES" -q -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning "$@"
