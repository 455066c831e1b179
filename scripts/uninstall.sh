#!/usr/bin/env bash
# Removes what scripts/install.sh installed: the services (stopped and
# disabled first), the units, the udev rules and /opt/otpd. The data stays:
# /var/lib/otpd (database, OTP key), /etc/otpd (configuration, users) and the
# user otpd that owns them, so a later install.sh picks up where this left off.
#
# Usage: sudo scripts/uninstall.sh [--prefix DIR] [--purge]
#   --prefix DIR  uninstall from DIR, as installed with install.sh --prefix DIR
#   --purge       also delete /var/lib/otpd, /etc/otpd and the user otpd
#                 (back up /var/lib/otpd first: docs/operators.md)
set -euo pipefail

usage() {
    sed -n '/^# Usage:/,/^#  *(back up/s/^# \{0,1\}//p' "$0"
}

die() {
    echo "uninstall.sh: $*" >&2
    exit 1
}

note() {
    echo "uninstall.sh: $*"
}

prefix=""
purge=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

if [ -n "$prefix" ]; then
    [ -d "$prefix" ] || die "$prefix is not a directory"
    root="$(cd "$prefix" && pwd)"
    [ "$root" != "/" ] || root=""
else
    root=""
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0), or give --prefix DIR"
fi

units=(otpd.service otpd-broker.service)
systemd_running=0
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemd_running=1
fi

if [ "$systemd_running" -eq 1 ]; then
    for unit in "${units[@]}"; do
        if systemctl cat "$unit" > /dev/null 2>&1; then
            systemctl disable --now --quiet "$unit" || note "could not stop $unit"
        fi
    done
fi

removed=()
remove() {
    local path
    for path in "$@"; do
        if [ -e "$path" ] || [ -L "$path" ]; then
            rm -rf -- "$path"
            removed+=("$path")
        fi
    done
}

remove "$root/etc/systemd/system/otpd.service" "$root/etc/systemd/system/otpd-broker.service" \
    "$root/etc/systemd/system/otpd.service.d" "$root/etc/systemd/system/otpd-broker.service.d"
rules="$root/etc/udev/rules.d/77-otpd-modems.rules"
had_rules=0
[ ! -e "$rules" ] || had_rules=1
remove "$rules"
remove "$root/opt/otpd"

if [ "$systemd_running" -eq 1 ]; then
    systemctl daemon-reload
fi
if [ -z "$root" ] && [ "$had_rules" -eq 1 ] && [ -S /run/udev/control ] &&
    command -v udevadm > /dev/null 2>&1; then
    udevadm control --reload
    udevadm trigger --subsystem-match=tty --action=change
fi

if [ "$purge" -eq 1 ]; then
    remove "$root/var/lib/otpd" "$root/etc/otpd"
    root_opt=()
    [ -z "$root" ] || root_opt=(--root "$root")
    if [ -f "$root/etc/passwd" ] && awk -F: '$1 == "otpd" { found = 1 } END { exit !found }' "$root/etc/passwd"; then
        userdel "${root_opt[@]}" otpd
        removed+=("user otpd")
    fi
    # userdel keeps the group where login.defs lacks USERGROUPS_ENAB yes.
    if [ -f "$root/etc/group" ] && awk -F: '$1 == "otpd" { found = 1 } END { exit !found }' "$root/etc/group"; then
        groupdel "${root_opt[@]}" otpd
        removed+=("group otpd")
    fi
else
    for kept in "$root/var/lib/otpd" "$root/etc/otpd"; do
        [ ! -e "$kept" ] || note "kept $kept (--purge deletes it)"
    done
fi

if [ ${#removed[@]} -eq 0 ]; then
    note "nothing to remove under ${root:-/}"
else
    note "removed: ${removed[*]}"
fi
