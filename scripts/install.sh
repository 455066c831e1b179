#!/usr/bin/env bash
# Installs (or upgrades) otpd from this source tree on a Raspberry Pi running
# Raspberry Pi OS / Debian 12 (any Debian-like system with systemd works):
#
#   system user otpd (group otpd, member of dialout for the modems' serial ports)
#   /opt/otpd               virtual environment: the pinned requirements.lock,
#                           then otpd itself (--no-deps); /opt/otpd/bin/otpd
#   /etc/otpd               0750 root:otpd; otpd.toml from etc/otpd.example.toml
#                           (0640 root:otpd), only if there is none yet;
#                           broker.acl.example for otpd broker (its broker.acl
#                           is never written: a user without a rule gets nothing)
#   /var/lib/otpd           0750 otpd:otpd (database, OTP key)
#   /etc/systemd/system     otpd.service, otpd-broker.service
#   /etc/udev/rules.d       77-otpd-modems.rules (stable modem names, ModemManager opt-out)
#
# Running it again is safe: what is already in place is left untouched, an
# existing /etc/otpd/otpd.toml is never overwritten, and the virtual
# environment is rebuilt only when the source, the lock file or the Python
# changed. systemctl/udevadm are called only when systemd/udev are running.
#
# Usage: sudo scripts/install.sh [--prefix DIR] [--python PYTHON] [--no-start]
#   --prefix DIR     install under DIR as if it were / (for tests and image
#                    staging): nothing outside DIR is touched, no service is
#                    started; the user is created in DIR/etc/passwd with
#                    useradd --root when that file exists, else skipped (the
#                    virtual environment's scripts refer to DIR/opt/otpd).
#   --python PYTHON  the interpreter for the virtual environment (3.11 or newer;
#                    default python3)
#   --no-start       do not enable, start or restart any service
#
# Without --no-start, a first install leaves otpd stopped (edit the
# configuration first); later runs enable otpd and (re)start it, so
# "edit /etc/otpd/otpd.toml, run install.sh again" starts it.
set -euo pipefail

usage() {
    sed -n '/^# Usage:/,/^# "edit/s/^# \{0,1\}//p' "$0"
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

prefix=""
python="python3"
start=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python="$2"; shift 2 ;;
        --python=*) python="${1#*=}"; shift ;;
        --no-start) start=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "$prefix" ]; then
    mkdir -p "$prefix"
    root="$(cd "$prefix" && pwd)"
    [ "$root" != "/" ] || root=""
else
    root=""
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0), or give --prefix DIR"
fi

venv="$root/opt/otpd"
etc_dir="$root/etc/otpd"
state_dir="$root/var/lib/otpd"
unit_dir="$root/etc/systemd/system"
udev_dir="$root/etc/udev/rules.d"
doc_dir="$venv/share/doc/otpd"
changed=()

note() {
    echo "install.sh: $*"
}

# -- Python -------------------------------------------------------------------
command -v "$python" > /dev/null 2>&1 || die "no $python; install it: apt-get install -y python3 python3-venv"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    die "otpd needs Python 3.11 or newer; $python is $("$python" --version 2>&1)"
fi
if ! "$python" -c 'import ensurepip, venv' > /dev/null 2>&1; then
    if [ -z "$root" ] && command -v apt-get > /dev/null 2>&1; then
        note "installing python3-venv (Debian splits venv/ensurepip out of python3)"
        apt-get install -y python3-venv
    else
        die "$python has no venv/ensurepip module; install it: apt-get install -y python3-venv"
    fi
fi

# -- user -----------------------------------------------------------------------
uid=""
gid=""
lookup_ids() {
    if [ -z "$root" ]; then
        uid="$(id -u otpd 2> /dev/null || true)"
        gid="$(getent group otpd | cut -d: -f3 || true)"
    else
        uid="$(awk -F: '$1 == "otpd" { print $3 }' "$root/etc/passwd" 2> /dev/null || true)"
        gid="$(awk -F: '$1 == "otpd" { print $3 }' "$root/etc/group" 2> /dev/null || true)"
    fi
}

in_dialout() {
    awk -F: -v u=otpd '$1 == "dialout" { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) found = 1 }
        END { exit !found }' "$root/etc/group"
}

root_opt=()
[ -z "$root" ] || root_opt=(--root "$root")
if [ -z "$root" ] || [ -f "$root/etc/passwd" ]; then
    lookup_ids
    if [ -z "$uid" ]; then
        groups_opt=()
        if grep -q '^dialout:' "$root/etc/group" 2> /dev/null; then
            groups_opt=(--groups dialout)
        else
            note "no group dialout; otpd will not be able to open serial ports until it is a member"
        fi
        useradd "${root_opt[@]}" --system --user-group "${groups_opt[@]}" \
            --home-dir /var/lib/otpd --no-create-home --shell /usr/sbin/nologin \
            --comment "otpd SMS/email OTP gateway" otpd 2> >(grep -v "missing or non-executable shell" >&2)
        changed+=("user otpd")
        lookup_ids
    elif grep -q '^dialout:' "$root/etc/group" 2> /dev/null && ! in_dialout; then
        usermod "${root_opt[@]}" --append --groups dialout otpd
        changed+=("otpd added to dialout")
    fi
    if [ -z "$uid" ] || [ -z "$gid" ]; then
        die "could not create or find the user otpd"
    fi
else
    note "no $root/etc/passwd: not creating the user otpd; files keep the installing user's ownership"
fi

# own UID GID PATH: chown when the user otpd is managed here and the ids differ
own() {
    local want_uid="$1" want_gid="$2" path="$3"
    [ -n "$uid" ] && [ -n "$want_uid" ] && [ -n "$want_gid" ] || return 0
    if [ "$(stat -c %u:%g "$path")" != "$want_uid:$want_gid" ]; then
        chown -h "$want_uid:$want_gid" "$path"
        changed+=("owner of $path")
    fi
}

# set_mode MODE PATH: chmod when it differs
set_mode() {
    if [ "$(stat -c %a "$2")" != "$1" ]; then
        chmod "$1" "$2"
        changed+=("mode of $2")
    fi
}

# directory PATH MODE UID GID
directory() {
    if [ ! -d "$1" ]; then
        mkdir -p "$(dirname "$1")"
        mkdir -m "$2" "$1"
        changed+=("$1")
    fi
    set_mode "$2" "$1"
    own "$3" "$4" "$1"
}

# put_file SRC DEST MODE UID GID: copy when missing or different
put_file() {
    local src="$1" dest="$2"
    if [ ! -f "$dest" ] || ! cmp -s "$src" "$dest"; then
        mkdir -p "$(dirname "$dest")"
        local tmp
        tmp="$(mktemp "$dest.XXXXXX")"
        cp "$src" "$tmp"
        chmod "$3" "$tmp"
        mv -f "$tmp" "$dest"
        changed+=("$dest")
    fi
    set_mode "$3" "$dest"
    own "$4" "$5" "$dest"
}

# -- virtual environment -------------------------------------------------------------
# Everything that decides the venv's contents, paths relative to the source.
source_stamp() {
    {
        "$python" -c 'import sys; print(sys.version)'
        cd "$repo"
        find otpd pyproject.toml README.md requirements.lock -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}

[ -f "$repo/requirements.lock" ] || die "$repo/requirements.lock is missing"
stamp_file="$venv/.otpd-install"
want_stamp="$(source_stamp)"
if [ -x "$venv/bin/python" ]; then
    have_version="$(PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -S -c 'import sys; print(sys.version)' 2> /dev/null || true)"
    if [ "$have_version" != "$("$python" -c 'import sys; print(sys.version)')" ]; then
        note "$venv was made with another Python; recreating it"
        rm -rf "$venv"
    fi
fi
if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$want_stamp" ]; then
    if [ ! -x "$venv/bin/python" ]; then
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv"
    fi
    note "installing the pinned dependencies and otpd into $venv (log: $venv/install.log)"
    rm -f "$stamp_file"
    # Build from a clean copy: nothing is written into the source tree, and
    # no stale build/ directory can slip old files into the package.
    src="$(mktemp -d)"
    trap 'rm -rf "$src"' EXIT
    tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - otpd pyproject.toml README.md |
        tar -C "$src" -xf -
    pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
    if ! { "${pip[@]}" install -r "$repo/requirements.lock" &&
           "${pip[@]}" install --no-deps --force-reinstall "$src"; } > "$venv/install.log" 2>&1; then
        tail -n 30 "$venv/install.log" >&2
        die "pip install failed; the full log is $venv/install.log"
    fi
    "$venv/bin/otpd" --version > /dev/null || die "$venv/bin/otpd does not run"
    echo "$want_stamp" > "$stamp_file"
    changed+=("$venv")
fi
put_file "$repo/docs/operators.md" "$doc_dir/operators.md" 644 0 0

# -- configuration and state -------------------------------------------------------
directory "$etc_dir" 750 0 "$gid"
first_install=0
if [ ! -e "$etc_dir/otpd.toml" ]; then
    put_file "$repo/etc/otpd.example.toml" "$etc_dir/otpd.toml" 640 0 "$gid"
    first_install=1
fi
# The example of this version, for reference next to the live file.
put_file "$repo/etc/otpd.example.toml" "$etc_dir/otpd.example.toml" 640 0 "$gid"
# otpd broker's topic permissions: the example only; the live file is the operator's.
put_file "$repo/etc/broker.acl.example" "$etc_dir/broker.acl.example" 640 0 "$gid"
if [ -f "$etc_dir/broker.htpasswd" ] && [ ! -e "$etc_dir/broker.acl" ]; then
    note "otpd broker refuses every user until $etc_dir/broker.acl exists;" \
        "start from $etc_dir/broker.acl.example, then: systemctl reload otpd-broker"
fi
directory "$state_dir" 750 "$uid" "$gid"

# -- systemd units and udev rules ---------------------------------------------------
units_before=${#changed[@]}
put_file "$repo/systemd/otpd.service" "$unit_dir/otpd.service" 644 0 0
put_file "$repo/systemd/otpd-broker.service" "$unit_dir/otpd-broker.service" 644 0 0
units_changed=$((${#changed[@]} - units_before))
rules_before=${#changed[@]}
put_file "$repo/etc/udev/77-otpd-modems.rules" "$udev_dir/77-otpd-modems.rules" 644 0 0
rules_changed=$((${#changed[@]} - rules_before))

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    if [ "$units_changed" -gt 0 ]; then
        systemctl daemon-reload
    fi
    if [ "$start" -eq 1 ] && [ "$first_install" -eq 0 ]; then
        systemctl enable --quiet otpd.service
        if systemctl restart otpd.service; then
            note "otpd (re)started: systemctl status otpd"
        else
            note "otpd did not start: journalctl -u otpd -n 50"
        fi
        systemctl try-restart otpd-broker.service || true
    fi
    if systemctl is-active --quiet ModemManager.service 2> /dev/null; then
        note "ModemManager is running: the udev rules tell it to leave known modems alone;" \
            "for others see docs/operators.md (ModemManager)"
    fi
fi
if [ -z "$root" ] && [ "$rules_changed" -gt 0 ] && [ -S /run/udev/control ] &&
    command -v udevadm > /dev/null 2>&1; then
    udevadm control --reload
    udevadm trigger --subsystem-match=tty --action=change
fi

if [ ${#changed[@]} -eq 0 ]; then
    note "nothing to do: otpd is installed and up to date under ${root:-/}"
else
    note "changed: ${changed[*]}"
fi
if [ "$first_install" -eq 1 ]; then
    cat << EOF
Next steps:
  1. edit ${etc_dir}/otpd.toml (check it: ${venv}/bin/otpd check-config --config ${etc_dir}/otpd.toml)
  2. add a REST user: ${venv}/bin/otpd passwd --users-file ${etc_dir}/users USER
     then: chgrp otpd ${etc_dir}/users
  3. start it: systemctl enable --now otpd   (or run this installer again)
EOF
fi
