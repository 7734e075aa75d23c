#!/bin/sh
# consumers.sh - the C++, Rust and Python consumers of libmoas and their checks.
#
#   consumers.sh run-example NAME PROGRAM
#       Run a generate example (C++ or Rust; arguments MODEL PROMPT N [routed]) on the
#       tiny model: it must print the prompt and N characters, print exactly what the
#       Python example prints for the same seed (the three languages share one library
#       and one sampler), and turn a bad prompt into exit status 1 naming the status.
#   consumers.sh all MAKE CXX [CARGO]
#       Install into a prefix under build/consumers/ (CONSUMERS_DIR), then build the C++
#       example and the Rust crate with nothing but pkg-config pointing at that prefix,
#       and load the Python binding through its pkg-config lookup; each must run against
#       the installed library. Rust is skipped, loudly, without cargo.
#
# tests/pkgconfig.sh covers the C example (shared and static), DESTDIR and uninstall.
set -eu
top=$(pwd)
model="$top/tests/data/tiny-moas-bias.gguf"
prompt="And God"
n=40

fail() { echo "consumers: FAIL: $*"; exit 1; }

# check_example NAME CMD...: CMD MODEL PROMPT N routed, compared with the Python example
check_example() {
    name=$1; shift
    out=$("$@" "$model" "$prompt" $n routed 2>"$work/err") ||
        fail "$name exited $?: $(cat "$work/err")"
    case "$out" in "$prompt"*) ;; *) fail "$name did not echo the prompt: $out" ;; esac
    want=$(python3 "$top/examples/python/generate.py" "$model" "$prompt" -n $n --mode routed \
           2>"$work/want_err") || fail "python example: $(cat "$work/want_err")"
    [ "$out" = "$want" ] || fail "$name and the Python example differ:
--- $name
$out
--- python
$want"
    cmp -s "$work/err" "$work/want_err" ||
        fail "$name reports '$(cat "$work/err")', Python '$(cat "$work/want_err")'"
    set +e
    "$@" "$model" "Quiz" >/dev/null 2>"$work/err"
    rc=$?
    set -e
    [ $rc -eq 1 ] || fail "$name exited $rc on an unknown character, expected 1"
    grep -q 'MOAS_ERR_UNKNOWN_CHAR.*U+0051' "$work/err" || fail "$name error: $(cat "$work/err")"
}

mode=${1:-all}
case $mode in
run-example)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    export MOAS_LIBRARY="${MOAS_LIBRARY:-$top/lib/libmoas.so.1}"
    check_example "$2" "$3"
    echo "$2: ok (same text and routing as the Python example; errors carry the status)"
    ;;
all)
    MAKE=${2:-make}
    CXX=${3:-c++}
    CARGO=${4:-}
    dir=${CONSUMERS_DIR:-$top/build/consumers}
    prefix="$dir/prefix"
    work="$dir/work"
    rm -rf "$prefix" "$work"
    mkdir -p "$work"
    $MAKE --no-print-directory -s install PREFIX="$prefix" >/dev/null
    export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
    unset MOAS_LIBRARY MOAS_LIB_DIR
    lib=$(pkg-config --variable=libdir moas)
    [ "$lib" = "$prefix/lib" ] || fail "pkg-config finds libdir $lib, not $prefix/lib"

    # C++: the RAII wrapper, compiled and linked by pkg-config alone
    $CXX -std=c++17 -Wall -Wextra -Werror examples/cpp/generate.cpp \
        $(pkg-config --cflags --libs moas) -o "$work/generate_cpp"
    readelf -d "$work/generate_cpp" | grep -q 'NEEDED.*libmoas.so.1' ||
        fail "C++ build does not need libmoas.so.1"
    LD_LIBRARY_PATH="$prefix/lib" ldd "$work/generate_cpp" | grep -q "$prefix/lib/libmoas.so.1" \
        || fail "C++ example does not load the installed libmoas"
    check_example "C++ (installed)" env LD_LIBRARY_PATH="$prefix/lib" "$work/generate_cpp"
    summary="C++"

    # Python: the binding's second lookup step, pkg-config
    got=$(python3 -c "import sys; sys.path.insert(0, 'bindings/python'); import moas
print(moas.library_path())")
    [ "$got" = "$prefix/lib/libmoas.so.1" ] || fail "the Python binding loaded $got"
    summary="$summary, Python"

    # Rust: build.rs asks pkg-config (MOAS_LIB_DIR unset) and puts the prefix in the rpath
    if [ -z "$CARGO" ]; then
        echo "*** SKIP: rust consumer (cargo not found) ***"
    else
        (cd examples/rust && CARGO_TARGET_DIR="$dir/rust" "$CARGO" build --offline -q &&
         CARGO_TARGET_DIR="$dir/rust" "$CARGO" test --offline -q >"$work/cargo_test" 2>&1) \
            || { cat "$work/cargo_test"; fail "cargo build/test against the installed prefix"; }
        readelf -d "$dir/rust/debug/generate" | grep -q "RUNPATH.*\[$prefix/lib\]" \
            || fail "the Rust example's rpath is not $prefix/lib"
        check_example "Rust (installed)" "$dir/rust/debug/generate"
        summary="$summary, Rust"
    fi
    echo "consumers: ok ($summary built and run against the installed prefix via pkg-config)"
    ;;
*)
    echo "usage: consumers.sh run-example NAME PROGRAM | all MAKE CXX [CARGO]"
    exit 2
    ;;
esac
