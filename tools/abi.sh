#!/bin/sh
# abi.sh check|update LIB BASELINE [SUPPRESSIONS] - the ABI of libmoas.so against the
# committed baseline, with abigail-tools (docs/API.md, "ABI baseline").
#
#   check   dump LIB's ABI (public types of include/ only) and compare it with BASELINE.
#           Equal: ok (SUPPRESSIONS allow fields appended to size-prefixed structs and
#           enumerators appended before _COUNT; a note says the baseline is stale). Only
#           added functions: fail, asking for `make abi-update` in the same commit. Any
#           other change: fail as incompatible, unless the SONAME major changed.
#   update  write BASELINE from LIB; refuses an incompatible change while the SONAME is
#           the baseline's (ABI_FORCE=1 overrides).
set -u
usage() { echo "usage: abi.sh check|update LIB BASELINE [SUPPRESSIONS]" >&2; exit 2; }
# before set -u meets a missing argument, and before abidw is looked for
[ $# -ge 3 ] && [ $# -le 4 ] || usage
case $1 in check|update) ;; *) usage ;; esac
mode=$1 lib=$2 baseline=$3 suppr=${4:-}
ABIDW=${ABIDW:-abidw}
ABIDIFF=${ABIDIFF:-abidiff}
dump=${ABI_DUMP:-${TMPDIR:-/tmp}/libmoas-abi.$$}
trap 'rm -f "$dump" "$dump.report"' EXIT

die() { echo "abi-$mode: $*" >&2; exit 1; }
command -v "$ABIDW" >/dev/null 2>&1 || die "abidw not found (install abigail-tools)"
[ -f "$lib" ] || die "$lib not built (run make)"
readelf -S "$lib" | grep -q '\.debug_info' ||
    die "$lib has no debug info (build with -g, as the default CFLAGS do)"

"$ABIDW" --no-corpus-path --no-comp-dir-path --no-show-locs --no-elf-needed \
    --headers-dir include --drop-private-types --type-id-style hash \
    --out-file "$dump" "$lib" || die "abidw failed"

soname() { sed -n "s/.*soname='\([^']*\)'.*/\1/p" "$1" | head -n 1; }

# classify: 0 equal, 1 only functions added, 2 anything else; the report in $dump.report
classify() {
    set -- ${suppr:+--suppressions "$suppr"}
    "$ABIDIFF" "$@" "$baseline" "$dump" >"$dump.report" 2>&1
    rc=$?
    [ $rc -eq 0 ] && return 0
    if [ $((rc & 3)) -ne 0 ]; then
        cat "$dump.report" >&2
        die "abidiff failed (status $rc)"
    fi
    if [ $((rc & 8)) -eq 0 ] &&
        "$ABIDIFF" "$@" --no-added-syms "$baseline" "$dump" >/dev/null 2>&1; then
        return 1
    fi
    return 2
}

case $mode in
check)
    [ -f "$baseline" ] || die "no baseline $baseline (run make abi-update and commit it)"
    classify
    case $? in
    0)
        echo "abi-check: ok ($(soname "$dump") matches $baseline)"
        cmp -s "$dump" "$baseline" ||
            echo "abi-check: note: the dump differs from $baseline only in ways abidiff" \
                "deems compatible (appended enumerators or params fields, or another" \
                "compiler's debug info); make abi-update refreshes it"
        ;;
    1)
        cat "$dump.report" >&2
        die "FAIL: the ABI grew (above). If that is intended, run make abi-update" \
            "and commit $baseline with the change."
        ;;
    2)
        cat "$dump.report" >&2
        old=$(soname "$baseline") new=$(soname "$dump")
        [ "$old" != "$new" ] &&
            die "FAIL: incompatible change with a new SONAME ($old -> $new):" \
                "run make abi-update and commit $baseline with the change."
        die "FAIL: incompatible ABI change (above) while the SONAME stays $new." \
            "Undo it, or bump MOAS_VERSION_MAJOR in include/moas.h (docs/API.md)."
        ;;
    esac
    ;;
update)
    if [ -f "$baseline" ]; then
        classify
        if [ $? -eq 2 ] && [ "$(soname "$dump")" = "$(soname "$baseline")" ] &&
            [ "${ABI_FORCE:-0}" != 1 ]; then
            cat "$dump.report" >&2
            die "refusing: incompatible change (above) with the same SONAME" \
                "$(soname "$dump"); bump MOAS_VERSION_MAJOR, or ABI_FORCE=1"
        fi
    fi
    mkdir -p "$(dirname "$baseline")"
    cp "$dump" "$baseline"
    echo "abi-update: wrote $baseline ($(soname "$baseline")," \
        "$(grep -c '<elf-symbol ' "$baseline") symbols)"
    ;;
esac
