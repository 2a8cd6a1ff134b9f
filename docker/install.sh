#!/usr/bin/env bash
# Creates yolodex's Python environments the way the Dockerfile does, inside the image and outside it
# (tests/test_containers.py runs this same script into a temporary folder).
#
#   docker/install.sh app           the app venv: `requirements` then `yolodex` (what the tests run)
#   docker/install.sh requirements  the app venv's packages: requirements.txt (the test tools are in requirements-dev.txt)
#   docker/install.sh yolodex       yolodex itself into the app venv, editable (the checkout is what runs)
#   docker/install.sh labelstudio   Label Studio's own venv: requirements-labelstudio.txt (it pins many packages)
# The Dockerfile runs `requirements` before it copies the code, so a code change does not reinstall the packages.
#
# Environment:
#   YOLODEX_SOURCE    the checkout to install from (pyproject.toml, requirements*.txt) [the folder above docker/]
#   YOLODEX_VENV      where the app venv goes (required for `app`; the image: /opt/yolodex/venv)
#   YOLODEX_LS_VENV   where Label Studio's venv goes (required for `labelstudio`; the image:
#                     /opt/yolodex/venv-labelstudio). backend/labeling/server.py reads the same variable.
#   TORCH_INDEX_URL   the package index torch (and only torch, with its dependencies) comes from, e.g.
#                     https://download.pytorch.org/whl/cpu or .../whl/cu126; empty: pip's default index, like
#                     every other package (on Linux, PyPI's torch is the CUDA build)
#   PYTHON            the interpreter that creates the venvs [python3]
#   DEV_PACKAGES      requirements.txt packages the app venv leaves out [none]
# pip's own variables (PIP_NO_CACHE_DIR, PIP_INDEX_URL, ...) pass through.
set -euo pipefail

usage="usage: docker/install.sh app|requirements|yolodex|labelstudio"
[ $# -eq 1 ] || { echo "$usage" >&2; exit 2; }
role=$1
source_dir=${YOLODEX_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
python=${PYTHON:-python3}
torch_index=${TORCH_INDEX_URL:-}
dev_packages=${DEV_PACKAGES:-}
pip_flags=(--quiet --progress-bar off --disable-pip-version-check)

make_venv() {
    local venv=$1
    if ! "$venv/bin/python" -c "import sys" >/dev/null 2>&1; then
        echo "install: creating $venv with $python ($("$python" --version 2>&1))"
        "$python" -m venv "$venv"
    fi
}

app_venv() {
    echo "${YOLODEX_VENV:?set YOLODEX_VENV to the folder the app venv goes to}"
}

install_requirements() {
    local venv
    venv=$(app_venv)
    local pip=("$venv/bin/python" -m pip install "${pip_flags[@]}")
    local requirements torch_pin pattern
    make_venv "$venv"
    requirements=$(mktemp)
    trap 'rm -f "$requirements"' RETURN
    # Every pin is installed exactly as `make setup` does (the test tools, in requirements-dev.txt, stay out).
    pattern="^($(echo "$dev_packages" | tr -s ' ' '|'))=="
    grep -viE "$pattern" "$source_dir/requirements.txt" >"$requirements"
    if [ -n "$torch_index" ]; then
        torch_pin=$(grep -E '^torch==' "$source_dir/requirements.txt") \
            || { echo "install: requirements.txt pins no torch==" >&2; exit 1; }
        # Only torch from that index: torch==X there is X+cpu (or +cu126), which the pin accepts below.
        echo "install: $torch_pin from $torch_index"
        "${pip[@]}" --index-url "$torch_index" "$torch_pin"
    fi
    echo "install: requirements.txt into $venv${dev_packages:+ (without: $dev_packages)}"
    "${pip[@]}" -r "$requirements"
}

install_yolodex() {
    local venv
    venv=$(app_venv)
    # Editable like `make setup`: the checkout (app/, pages/, backend/) is what runs; no second copy of it.
    echo "install: yolodex from $source_dir into $venv"
    "$venv/bin/python" -m pip install "${pip_flags[@]}" --no-deps --editable "$source_dir"
}

install_labelstudio() {
    local venv=${YOLODEX_LS_VENV:?set YOLODEX_LS_VENV to the folder Label Studio\'s venv goes to}
    make_venv "$venv"
    echo "install: requirements-labelstudio.txt into $venv"
    "$venv/bin/python" -m pip install "${pip_flags[@]}" -r "$source_dir/requirements-labelstudio.txt"
}

case "$role" in
    app) install_requirements && install_yolodex ;;
    requirements) install_requirements ;;
    yolodex) install_yolodex ;;
    labelstudio) install_labelstudio ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
echo "install: $role done"
