#!/usr/bin/env bash
# The test command: installs what the tests need (Debian packages, a Python venv with the
# InCountry SDK), then runs cargo fmt --check, clippy -D warnings and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql: tests/postgres runs a private cluster per test (initdb in a temp dir).
apt_packages=(softhsm2 oathtool sqlite3 util-linux mount systemd procps python3 postgresql)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "== installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Two venvs: the InCountry SDK needs pydantic<2, moto's server pulls in pydantic 2.
make_venv() { # DIR IMPORTS PACKAGES...
    local dir=$1 imports=$2; shift 2
    if ! "$dir/bin/python" -c "import $imports" 2>/dev/null; then
        echo "== making $dir ($*)"
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q --disable-pip-version-check "$@"
    fi
}
make_venv .venv incountry "incountry==5.0.0" "pydantic<2"
make_venv .venv-moto "moto, boto3, flask" "moto[server]" boto3
export KEYD_TEST_PYTHON="$PWD/.venv/bin/python"
export KEYD_TEST_MOTO_PYTHON="$PWD/.venv-moto/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --features test-clock -- -D warnings
# The release build has no test seams: it must be clean too.
cargo clippy --lib --bins -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Every binary runs even after a failure, so one CI run shows every failing test.
cargo test --no-fail-fast --features test-clock 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# One closing line over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
