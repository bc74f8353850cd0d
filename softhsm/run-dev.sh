#!/usr/bin/env bash
# Development run: installs SoftHSM if missing, makes a development token under .dev/
# (git-ignored), builds, and runs the daemon in the foreground on .dev/keyd.sock with a
# config that lets the current user read and administer (verification off: development only).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dev="$repo/.dev"

if [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 >/dev/null
fi
softhsm/make-token.sh "$dev/hsm"

uid=$(id -u)
cat > "$dev/keyd.toml" <<TOML
version = 1
[server]
socket = "$dev/keyd.sock"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "incountry-keyd"
pin_file = "$dev/hsm/user-pin"
[state]
dir = "$dev/state"
[access]
readers = ["uid:$uid"]
admins = ["uid:$uid"]
[limits]
versions_per_day = 3
[verification]
mode = "off"
[log]
level = "debug"
TOML

cargo build --release
bin="$repo/target/release/incountry-keyd"
cat <<TXT

incountry-keyd (development) on $dev/keyd.sock. Try, in another terminal:
  curl --unix-socket $dev/keyd.sock http://localhost/v1/health
  $bin --socket $dev/keyd.sock keys create dev DE --rotation-period-days 30
  $bin --socket $dev/keyd.sock keys show dev DE
  curl --unix-socket $dev/keyd.sock http://localhost/v1/keys/dev/DE/secrets
Stop with Ctrl-C.

TXT
export SOFTHSM2_CONF="$dev/hsm/softhsm2.conf"
exec "$bin" serve --config "$dev/keyd.toml"
