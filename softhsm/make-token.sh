#!/usr/bin/env bash
# Creates (once) a SoftHSM token for incountry-keyd under DIR:
#   DIR/softhsm2.conf   point SOFTHSM2_CONF here
#   DIR/tokens/         the token store
#   DIR/user-pin        the user PIN (mode 0600), for hsm.pin_file or LoadCredential=
#   DIR/so-pin          the security officer PIN (mode 0600)
# Running it again changes nothing. Usage: make-token.sh DIR [TOKEN_LABEL]
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [TOKEN_LABEL]" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
dir=$(realpath -m "$1")
label=${2:-incountry-keyd}
command -v softhsm2-util >/dev/null || { echo "softhsm2-util not found: apt-get install softhsm2" >&2; exit 1; }

umask 077
mkdir -p "$dir/tokens"
conf="$dir/softhsm2.conf"
[ -f "$conf" ] || sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.template" > "$conf"
export SOFTHSM2_CONF="$conf"

new_pin() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
[ -s "$dir/so-pin" ] || new_pin > "$dir/so-pin"
[ -s "$dir/user-pin" ] || new_pin > "$dir/user-pin"

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+${label}[[:space:]]*$"; then
    echo "token '$label' already exists in $dir"
else
    # The PINs pass on softhsm2-util's command line: acceptable for a development or test
    # token on this host, not for production tokens (initialise those interactively).
    softhsm2-util --init-token --free --label "$label" \
        --so-pin "$(cat "$dir/so-pin")" --pin "$(cat "$dir/user-pin")" >/dev/null
    echo "created token '$label' in $dir"
fi
