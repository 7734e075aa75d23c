#!/bin/sh
# pkgconfig.sh MAKE CC - install libmoas into a temporary prefix, then build and run
# examples/simple.c the way a user would: with pkg-config, once against the shared
# library and once statically. Also checks DESTDIR staging and uninstall.
set -eu
MAKE=${1:-make}
CC=${2:-cc}
top=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"
model="$top/tests/data/tiny-moas-bias.gguf"

fail() { echo "pkgconfig: FAIL: $*"; exit 1; }
command -v pkg-config >/dev/null 2>&1 ||
    { echo "*** SKIP: pkg-config consumer (pkg-config not found: apt-get install pkg-config) ***"; exit 0; }

# check_errors CMD...: without arguments the example prints a usage line to stderr and
# exits 2; on a library error it prints the library's message (naming the path), exit 1
check_errors() {
    rc=0; "$@" >/dev/null 2>"$tmp/err" || rc=$?
    [ $rc -eq 2 ] && grep -q '^usage: .*MODEL' "$tmp/err" ||
        fail "example without arguments exited $rc, said: $(cat "$tmp/err")"
    rc=0; "$@" /dev/null >/dev/null 2>"$tmp/err" || rc=$?
    [ $rc -eq 1 ] && grep -q "^error: model_load: .*'/dev/null'" "$tmp/err" ||
        fail "example on /dev/null exited $rc, said: $(cat "$tmp/err")"
}

said=$($MAKE --no-print-directory -s install PREFIX="$prefix")
case "$said" in *"pip install"*"bindings/python"*) ;;
    *) fail "install does not say how to install the Python package" ;; esac
for f in include/moas.h include/moas.hpp lib/libmoas.a lib/libmoas.so lib/libmoas.so.1 lib/pkgconfig/moas.pc; do
    [ -e "$prefix/$f" ] || fail "install did not create $f"
done
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
[ "$(pkg-config --modversion moas)" = "$(sed -n 's/^#define MOAS_VERSION_STRING "\(.*\)"/\1/p' include/moas.h)" ] \
    || fail "pkg-config --modversion does not match moas.h"

# shared: the program needs libmoas.so.1 and runs against the installed copy
$CC -std=c11 -Wall -Wextra -Werror examples/simple.c $(pkg-config --cflags --libs moas) -o "$tmp/simple_shared"
readelf -d "$tmp/simple_shared" | grep -q 'NEEDED.*libmoas.so.1' || fail "shared build does not need libmoas.so.1"
out=$(LD_LIBRARY_PATH="$prefix/lib" "$tmp/simple_shared" "$model") || fail "shared example failed"
case "$out" in "In the beginning"*) ;; *) fail "shared example printed: $out" ;; esac
check_errors env LD_LIBRARY_PATH="$prefix/lib" "$tmp/simple_shared"

# static: libmoas.a linked in, the private libraries from Libs.private
libs=$(pkg-config --static --libs moas | sed 's/-lmoas/-Wl,-Bstatic -lmoas -Wl,-Bdynamic/')
$CC -std=c11 -Wall -Wextra -Werror examples/simple.c $(pkg-config --cflags moas) $libs -o "$tmp/simple_static"
if readelf -d "$tmp/simple_static" | grep -q 'NEEDED.*libmoas'; then fail "static build still needs libmoas.so"; fi
out2=$("$tmp/simple_static" "$model") || fail "static example failed"
[ "$out" = "$out2" ] || fail "static and shared examples differ"
check_errors "$tmp/simple_static"

# staging with DESTDIR, then uninstall removes every file
$MAKE --no-print-directory -s install DESTDIR="$tmp/stage" PREFIX=/opt/moas >/dev/null
[ -e "$tmp/stage/opt/moas/lib/libmoas.so.1" ] || fail "DESTDIR install missing libmoas.so.1"
grep -q '^prefix=/opt/moas$' "$tmp/stage/opt/moas/lib/pkgconfig/moas.pc" || fail "moas.pc prefix is not /opt/moas"
$MAKE --no-print-directory -s uninstall DESTDIR="$tmp/stage" PREFIX=/opt/moas >/dev/null
left=$(find "$tmp/stage" -type f -o -type l)
[ -z "$left" ] || fail "uninstall left: $left"
echo "pkgconfig: ok (shared and static consumers built with pkg-config and run; usage and library errors reported)"
