#!/usr/bin/env bash
# Run swapd's whole test suite on a fresh machine; CI runs exactly this.
#
# Installs what the tests need, each step skipped when already done:
#   .venv            swapd with its test extras (pip install -e '.[test]')
#   nginx            from Debian packages, when missing and we are root
#   chromium         likewise, for the web UI tests (Playwright drives the system browser)
#   tests/js         the JavaScript clients the tests drive (npm ci; needs node and npm)
#   cmake, g++       likewise, for building llama-server
#   .venv-litellm    LiteLLM's proxy in its own virtualenv
#   llama-server and SmolLM2's GGUF, via `swapd setup` (cached in ~/.cache/swapd)
# then `ruff check swapd`, `ruff format --check swapd` and `mypy swapd` (any failing fails the script;
# SWAPD_LINT=0 skips them),
# then runs pytest. Arguments are passed to pytest (e.g. -k nginx, -x).
#
# A step that fails only warns: the tests that need it then skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
warn() { printf 'scripts/test.sh: warning: %s\n' "$*" >&2; }
SECONDS=0

step "virtualenv .venv with swapd[test]"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check -e '.[test]'

apt_updated=0
apt_install() {  # apt_install PACKAGE...: best effort, root only
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        warn "cannot install $* (not root, or no apt-get)"
        return 1
    fi
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || warn "apt-get update failed"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step "nginx"
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    echo "present: $(command -v nginx || echo /usr/sbin/nginx)"
else
    apt_install nginx-light || apt_install nginx || warn "nginx could not be installed; its tests will skip"
fi

step "chromium for the web UI tests"
if command -v chromium >/dev/null; then
    echo "present: $(command -v chromium)"
else
    apt_install chromium || warn "chromium could not be installed; the browser tests will skip"
fi

step "JavaScript clients in tests/js (npm ci)"
if [ -d tests/js/node_modules/ollama ]; then
    echo "present: tests/js/node_modules"
elif command -v npm >/dev/null; then
    (cd tests/js && npm ci --silent --no-audit --no-fund) || warn "npm ci in tests/js failed; the JavaScript client tests will skip"
else
    warn "npm is not installed; the JavaScript client tests will skip"
fi

step "build tools for llama-server"
if command -v llama-server >/dev/null; then
    echo "llama-server is on PATH: $(command -v llama-server)"
else
    missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v c++ >/dev/null || command -v g++ >/dev/null || missing+=(g++)
    command -v make >/dev/null || command -v ninja >/dev/null || missing+=(make)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}" || warn "could not install ${missing[*]}; the llama-server tests will skip"
    else
        echo "present: cmake, a C++ compiler, make/ninja"
    fi
fi

step "LiteLLM proxy in .venv-litellm"
LITELLM_VERSION="${SWAPD_LITELLM_VERSION:-1.100.5}"
if [ -x .venv-litellm/bin/litellm ]; then
    echo "present: $(.venv-litellm/bin/litellm --version 2>/dev/null | tail -1)"
else
    rm -rf .venv-litellm
    python3 -m venv .venv-litellm || warn "python3 -m venv .venv-litellm failed"
    # one line per package as pip fetches it, as progress
    { PYTHONUNBUFFERED=1 .venv-litellm/bin/pip install --disable-pip-version-check --progress-bar off \
        "litellm[proxy]==${LITELLM_VERSION}" 2>&1 || true; } \
        | grep --line-buffered -E '^(Collecting|Successfully installed|ERROR)' | cut -c1-160 || true
    [ -x .venv-litellm/bin/litellm ] || warn "LiteLLM did not install; its tests will try again, then skip"
fi
echo "took ${SECONDS}s so far"

step "swapd setup: llama-server and the SmolLM2 model"
if ! swapd setup; then
    warn "swapd setup failed; the llama-server tests will try again, then skip or fail with the reason"
fi
echo "took ${SECONDS}s so far"

if [ "${SWAPD_LINT:-1}" = 1 ]; then
    step "lint: ruff check + format --check, mypy (SWAPD_LINT=0 skips)"
    lint_rc=0
    ruff check swapd || lint_rc=1
    ruff format --check swapd || lint_rc=1
    mypy swapd || lint_rc=1
    if [ "$lint_rc" != 0 ]; then
        echo "scripts/test.sh: lint failed (ruff or mypy above); not running pytest" >&2
        exit 1
    fi
fi

step "pytest"
set +e
python -m pytest -q "$@"
rc=$?
set -e
echo "scripts/test.sh: total ${SECONDS}s"
exit $rc
