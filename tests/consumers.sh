#!/bin/sh
# consumers.sh - the C++, Rust and Python consumers of libmoas and their checks.
#
#   consumers.sh run-example NAME PROGRAM
#       Run a generate example (C++ or Rust; arguments MODEL PROMPT N [routed]) on the
#       tiny model: it must print the prompt and N characters, print exactly what the
#       Python example prints for the same seed (the three languages share one library
#       and one sampler), and turn a bad prompt into exit status 1 naming the status.
#   consumers.sh usage NAME PROGRAM
#       PROGRAM without arguments must print a usage line to stderr and exit 2 (run-example
#       checks this too, for its program and the Python example).
#   consumers.sh rust-consumer CARGO TARGET_DIR
#       Build tests/rust-consumer, a crate outside bindings/rust that depends on the moas
#       and moas-sys crates by path, with the library wherever MOAS_LIB_DIR or pkg-config
#       says, three ways, and run its binary with LD_LIBRARY_PATH unset: statically
#       linked (no libmoas.so needed, no rpath), dynamically linked with the rpath its
#       build.rs takes from DEP_MOAS_LIBDIR, and without that rpath (it must fail to load
#       libmoas.so.1, unless the system loader finds an installed one).
#   consumers.sh all MAKE CXX [CARGO]
#       Install into a prefix under build/consumers/ (CONSUMERS_DIR), then build the C++
#       example, the Rust crates (bindings/rust: tests and the generate example) and the
#       Rust consumer with nothing but pkg-config pointing at that prefix, and load the
#       Python binding through its pkg-config lookup; each must run against the
#       installed library. Rust is skipped, loudly, without cargo.
#
# tests/pkgconfig.sh covers the C example (shared and static), DESTDIR and uninstall.
set -eu
top=$(pwd)
model="$top/tests/data/tiny-moas-bias.gguf"
prompt="And God"
n=40

fail() { echo "consumers: FAIL: $*"; exit 1; }

# check_usage NAME CMD...: CMD without arguments prints a usage line to stderr and
# exits 2 (never an empty "error: ")
check_usage() {
    name=$1; shift
    rc=0; "$@" >/dev/null 2>"$work/usage_err" || rc=$?
    [ $rc -eq 2 ] && grep -q '^usage: ' "$work/usage_err" ||
        fail "$name without arguments exited $rc, said: $(cat "$work/usage_err")"
}

# check_example NAME CMD...: CMD MODEL PROMPT N routed, compared with the Python example
check_example() {
    name=$1; shift
    check_usage "$name" "$@"
    check_usage "python example" python3 "$top/examples/python/generate.py"
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

# rust_consumer CARGO TARGET_DIR: the checks of `consumers.sh rust-consumer`
rust_consumer() {
    cargo=$1 target=$2
    for how in static dylib no-rpath; do
        case $how in
        static) features="--features static" no_rpath= ;;
        dylib) features= no_rpath= ;;
        no-rpath) features= no_rpath=1 ;;
        esac
        (cd "$top/tests/rust-consumer" && RUST_CONSUMER_NO_RPATH=$no_rpath \
            CARGO_TARGET_DIR="$target/$how" "$cargo" build --offline -q $features) \
            >"$work/cargo_$how" 2>&1 || { cat "$work/cargo_$how"; fail "rust-consumer ($how) build"; }
        bin="$target/$how/debug/rust-consumer"
        readelf -d "$bin" >"$work/dynamic_$how"
        set +e
        env -u LD_LIBRARY_PATH "$bin" "$model" "$prompt" 20 >"$work/out_$how" 2>"$work/err_$how"
        rc=$?
        set -e
        case $how in
        static)
            ! grep -q 'NEEDED.*libmoas' "$work/dynamic_$how" || fail "the static consumer needs libmoas.so"
            ! grep -qE 'RPATH|RUNPATH' "$work/dynamic_$how" || fail "the static consumer has an rpath"
            [ $rc -eq 0 ] || fail "the static consumer exited $rc: $(cat "$work/err_$how")"
            grep -q 'static: /' "$work/err_$how" || fail "static consumer: $(cat "$work/err_$how")"
            case $(cat "$work/out_$how") in "$prompt"?*) ;; *) fail "static consumer printed: $(cat "$work/out_$how")" ;; esac
            ;;
        dylib)
            grep -q 'NEEDED.*libmoas.so.1' "$work/dynamic_$how" || fail "the dynamic consumer does not need libmoas.so.1"
            grep -qE 'RUNPATH.*\[/' "$work/dynamic_$how" || fail "the dynamic consumer has no rpath"
            [ $rc -eq 0 ] || fail "the dynamic consumer exited $rc: $(cat "$work/err_$how")"
            grep -q 'dylib: /' "$work/err_$how" || fail "dynamic consumer: $(cat "$work/err_$how")"
            cmp -s "$work/out_static" "$work/out_dylib" || fail "the static and dynamic consumers differ:
$(cat "$work/out_static")
$(cat "$work/out_dylib")"
            ;;
        no-rpath)
            if { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q 'libmoas\.so\.1 '; then
                echo "rust-consumer: (the loader finds an installed libmoas.so.1: no-rpath check skipped)"
            else
                [ $rc -eq 127 ] && grep -q 'libmoas.so.1: cannot open shared object file' "$work/err_$how" ||
                    fail "the consumer without an rpath exited $rc: $(cat "$work/err_$how")"
            fi
            ;;
        esac
    done
    echo "rust-consumer: ok (by path: static runs alone, dynamic runs by its DEP_MOAS_LIBDIR rpath; both print: $(cat "$work/out_static"))"
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
usage)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    check_usage "$2" "$3"
    ;;
rust-consumer)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    rust_consumer "$2" "$3"
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

    # Rust: moas-sys's build.rs asks pkg-config (MOAS_LIB_DIR unset); the moas crate's
    # tests and example get the prefix as their rpath, and so does the consumer crate
    if [ -z "$CARGO" ]; then
        echo "*** SKIP: rust consumer (cargo not found) ***"
    else
        (cd bindings/rust && CARGO_TARGET_DIR="$dir/rust" "$CARGO" build --offline -q --all-targets &&
         CARGO_TARGET_DIR="$dir/rust" "$CARGO" test --offline -q >"$work/cargo_test" 2>&1) \
            || { cat "$work/cargo_test"; fail "cargo build/test against the installed prefix"; }
        readelf -d "$dir/rust/debug/examples/generate" | grep -q "RUNPATH.*\[$prefix/lib\]" \
            || fail "the Rust example's rpath is not $prefix/lib"
        check_example "Rust (installed)" "$dir/rust/debug/examples/generate"
        rust_consumer "$CARGO" "$dir/rust-consumer"
        grep -q "pkg-config, static: $prefix/lib" "$work/err_static" ||
            fail "the static consumer did not link the prefix's libmoas.a: $(cat "$work/err_static")"
        grep -q "RUNPATH.*\[$prefix/lib\]" "$work/dynamic_dylib" ||
            fail "the dynamic consumer's rpath is not $prefix/lib"
        summary="$summary, Rust (bindings and a consumer crate, static and dynamic)"
    fi
    echo "consumers: ok ($summary built and run against the installed prefix via pkg-config)"
    ;;
*)
    echo "usage: consumers.sh run-example NAME PROGRAM | usage NAME PROGRAM | rust-consumer CARGO TARGET_DIR | all MAKE CXX [CARGO]"
    exit 2
    ;;
esac
