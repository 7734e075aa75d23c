//! Every struct of moas-sys has the layout of include/moas.h's, as the system's C
//! compiler lays it out: abi/layout.c, built with `$CC` (else `cc`) at test time, prints
//! each struct's size and alignment and each field's offset, size and kind (float,
//! integer, pointer), in the header's order (tests/python/test_binding.py checks that
//! list against the header itself). A field missing here does not compile, and one of
//! another type (an i32 for a float too), in another place or a struct with one more all
//! fail.
use std::mem::{align_of, size_of, MaybeUninit};
use std::path::Path;
use std::process::Command;

/// (field, offset, size, kind) of one field.
type Field = (String, usize, usize, &'static str);
/// (name, size, alignment, fields) of one struct.
type Layout = (String, usize, usize, Vec<Field>);

/// abi/layout.c's kind of a field's type: "f" floating point, "i" integer, "p" pointer
/// (a function pointer too); an array's is its elements'. Same-sized types of two kinds
/// (f32 and i32, a pointer and a u64) lay out alike: only this tells them apart.
trait Kind {
    const KIND: &'static str;
}

macro_rules! kind {
    ($k:literal: $($t:ty),*) => { $(impl Kind for $t { const KIND: &'static str = $k; })* };
}
kind!("f": f32, f64);
kind!("i": i8, u8, i16, u16, i32, u32, i64, u64, isize, usize);
impl<T> Kind for *const T {
    const KIND: &'static str = "p";
}
impl<T> Kind for *mut T {
    const KIND: &'static str = "p";
}
impl<T: Kind, const N: usize> Kind for [T; N] {
    const KIND: &'static str = T::KIND;
}
macro_rules! fn_kind {
    ($($a:ident),*) => {
        impl<R, $($a),*> Kind for Option<unsafe extern "C" fn($($a),*) -> R> {
            const KIND: &'static str = "p";
        }
    };
}
fn_kind!();
fn_kind!(A);
fn_kind!(A, B);
fn_kind!(A, B, C);
fn_kind!(A, B, C, D);
fn_kind!(A, B, C, D, E);
fn_kind!(A, B, C, D, E, F);
fn_kind!(A, B, C, D, E, F, G);
fn_kind!(A, B, C, D, E, F, G, H);

fn size_of_target<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

fn kind_of_target<T, F: Kind>(_: fn(&T) -> &F) -> &'static str {
    F::KIND
}

/// A moas-sys struct's layout, its fields listed in the header's order (a Rust field
/// named `type_` is the header's `type`).
macro_rules! layout {
    ($t:ident { $($f:ident),* $(,)? }) => {{
        let probe = MaybeUninit::<moas_sys::$t>::uninit();
        let base = probe.as_ptr();
        let fields = vec![$((
            stringify!($f).trim_end_matches('_').to_string(),
            // SAFETY: addr_of! forms the field's address without reading it.
            unsafe { std::ptr::addr_of!((*base).$f) as usize - base as usize },
            size_of_target(|s: &moas_sys::$t| &s.$f),
            kind_of_target(|s: &moas_sys::$t| &s.$f),
        )),*];
        (stringify!($t).to_string(), size_of::<moas_sys::$t>(), align_of::<moas_sys::$t>(), fields)
    }};
}

fn rust_layouts() -> Vec<Layout> {
    vec![
        layout!(moas_allocator { alloc, free, user }),
        layout!(moas_model_params {
            size,
            use_mmap,
            log,
            log_user,
            allocator
        }),
        layout!(moas_tensor_info {
            size,
            name,
            type_,
            n_dims,
            ne,
            offset,
            n_bytes,
            data
        }),
        layout!(moas_context_params {
            size,
            n_ctx,
            n_threads,
            mode,
            kv_type,
            kernels,
            log,
            log_user,
            allocator,
            forced_scheme,
            kv_budget_bytes,
            route_fn,
            route_user,
            pool,
            n_batch,
        }),
        layout!(moas_pool_params {
            size,
            capacity_bytes,
            kv_type,
            page_heads,
            n_threads,
            kernels,
            n_batch,
            log,
            log_user,
            allocator,
            steer_below,
            commit,
        }),
        layout!(moas_pool_info {
            size,
            page_heads,
            page_bytes,
            n_pages,
            pages_free,
            n_contexts,
            bytes_capacity,
            bytes_held,
            bytes_used,
            bytes_stored,
            n_threads,
        }),
        layout!(moas_pool_seq {
            ctx,
            tokens,
            n_tokens,
            which,
            logits
        }),
        layout!(moas_tokenize_params {
            size,
            unknown,
            replacement
        }),
        layout!(moas_logit_bias { token, bias }),
        layout!(moas_sampler_params {
            size,
            temperature,
            top_k,
            top_p,
            seed,
            allocator,
            min_p,
            repeat_penalty,
            repeat_last_n,
            n_logit_bias,
            logit_bias,
            frequency_penalty,
            presence_penalty,
        }),
    ]
}

fn c_layouts() -> Vec<Layout> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moas-layout");
    // $CC may be a command with words of its own ("ccache gcc", "gcc -m64"); an empty
    // one is taken as unset
    let cc = std::env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "cc".to_string());
    let words: Vec<&str> = cc.split_whitespace().collect();
    let (program, cc_args) = words.split_first().expect("cc is a word");
    let built = Command::new(program)
        .args(cc_args)
        .args(["-std=c11", "-I"])
        .arg(root.join("include"))
        .arg(root.join("abi/layout.c"))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(built.success(), "{cc} could not build abi/layout.c");
    let out = Command::new(&exe)
        .output()
        .expect("abi/layout.c's program runs");
    assert!(out.status.success());
    let mut layouts: Vec<Layout> = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| -> usize { words[i].parse().unwrap() };
        match words[0] {
            "struct" => layouts.push((words[1].to_string(), number(2), number(3), Vec::new())),
            _ => {
                let kind = match words[4] {
                    "f" => "f",
                    "i" => "i",
                    "p" => "p",
                    other => panic!("abi/layout.c: a kind {other}"),
                };
                layouts
                    .last_mut()
                    .expect("a field after its struct")
                    .3
                    .push((words[1].to_string(), number(2), number(3), kind))
            }
        }
    }
    layouts
}

#[test]
fn structs_have_the_headers_layout() {
    let c = c_layouts();
    let rust = rust_layouts();
    let names = |v: &[Layout]| v.iter().map(|l| l.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&rust), names(&c), "the structs of abi/layout.c");
    for (r, c) in rust.iter().zip(&c) {
        assert_eq!(
            r, c,
            "{}: (name, size, alignment, [(field, offset, size, kind)])",
            c.0
        );
    }
}
