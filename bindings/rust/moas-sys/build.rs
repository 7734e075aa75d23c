//! Finds libmoas and links it; no dependencies.
//!
//! Where: `MOAS_LIB_DIR` if set, else what `pkg-config --variable=libdir moas` says
//! (`PKG_CONFIG` names another pkg-config), else this source tree's `lib/`.
//!
//! How: the shared library (`-l dylib=moas`) by default. With the `static` feature (or
//! `MOAS_STATIC=1`), libmoas.a, plus its private libraries: what
//! `pkg-config --static --libs moas` lists, or the `Libs.private` line of the `moas.pc`
//! beside the library, or `-lm`. The library's threads are POSIX threads, which Rust's
//! standard library links already (`-pthread` needs nothing more).
//!
//! Link arguments of a build script apply to its own crate's targets only, so nothing
//! here can put the directory into a dependent's binary. Dependents get it as metadata
//! (this crate is `links = "moas"`): `DEP_MOAS_LIBDIR`, `DEP_MOAS_ROOT`,
//! `DEP_MOAS_INCLUDE` and `DEP_MOAS_STATIC` (`1` or `0`) in the environment of the build
//! script of every crate that depends on moas-sys directly. A dependent that links the
//! shared library and wants its binaries to run in place adds
//! `cargo:rustc-link-arg=-Wl,-rpath,$DEP_MOAS_LIBDIR` (the `moas` crate does so for its
//! tests and examples), or installs the library where the loader looks.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn pkg_config(args: &[&str]) -> Option<String> {
    let program = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let out = Command::new(program).args(args).arg("moas").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if out.status.success() && !text.is_empty() {
        Some(text)
    } else {
        None
    }
}

/// The `Libs.private` flags of a moas.pc file (they hold no `${variables}`).
fn pc_libs_private(pc: &Path) -> Option<Vec<String>> {
    let text = fs::read_to_string(pc).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("Libs.private:"))?;
    Some(line.split_whitespace().map(str::to_string).collect())
}

fn main() {
    for var in [
        "MOAS_LIB_DIR",
        "MOAS_STATIC",
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let link_static = env::var_os("CARGO_FEATURE_STATIC").is_some()
        || env::var("MOAS_STATIC").as_deref() == Ok("1");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let tree = manifest.join("../../..");
    let tree = tree.canonicalize().unwrap_or(tree);

    // (library directory, prefix, include directory, how it was found)
    let (dir, root, include, how) = match env::var("MOAS_LIB_DIR") {
        Ok(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            let root = dir.parent().map_or_else(|| dir.clone(), Path::to_path_buf);
            let include = root.join("include");
            (dir, root, include, "MOAS_LIB_DIR")
        }
        _ => match pkg_config(&["--variable=libdir"]) {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                let root = pkg_config(&["--variable=prefix"]).map_or_else(
                    || dir.parent().map_or_else(|| dir.clone(), Path::to_path_buf),
                    PathBuf::from,
                );
                let include = pkg_config(&["--variable=includedir"])
                    .map_or_else(|| root.join("include"), PathBuf::from);
                (dir, root, include, "pkg-config")
            }
            None => (
                tree.join("lib"),
                tree.clone(),
                tree.join("include"),
                "the source tree",
            ),
        },
    };
    let dir_s = dir.to_string_lossy().into_owned();
    println!("cargo:rustc-link-search=native={dir_s}");

    if link_static {
        let archive = dir.join("libmoas.a");
        if !archive.is_file() {
            panic!(
                "moas-sys: the static feature needs {} (found through {how}); build it \
                 with `make lib`, or point MOAS_LIB_DIR at a directory that has it",
                archive.display()
            );
        }
        println!("cargo:rerun-if-changed={}", archive.display());
        println!("cargo:rustc-link-lib=static=moas");

        let private = if how == "pkg-config" {
            pkg_config(&["--static", "--libs"])
                .map(|s| s.split_whitespace().map(str::to_string).collect())
        } else {
            pc_libs_private(&dir.join("moas.pc"))
        };
        let private = private.unwrap_or_else(|| vec!["-lm".to_string()]);
        let mut libs: Vec<String> = Vec::new();
        for flag in &private {
            if let Some(path) = flag.strip_prefix("-L") {
                if Path::new(path) != dir {
                    println!("cargo:rustc-link-search=native={path}");
                }
            } else if let Some(lib) = flag.strip_prefix("-l") {
                if lib != "moas" {
                    libs.push(lib.to_string());
                }
            }
        }
        for lib in &libs {
            println!("cargo:rustc-link-lib={lib}");
        }
        let with: Vec<String> = libs.iter().map(|l| format!("-l{l}")).collect();
        println!(
            "cargo:rustc-env=MOAS_LINKED_FROM={how}, static: {dir_s} (with {})",
            with.join(" ")
        );
    } else {
        println!("cargo:rerun-if-changed={dir_s}/libmoas.so");
        println!("cargo:rustc-link-lib=dylib=moas");
        // This crate's own tests run in place; dependents do the same with DEP_MOAS_LIBDIR.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir_s}");
        println!("cargo:rustc-env=MOAS_LINKED_FROM={how}, dylib: {dir_s}");
    }

    println!("cargo:root={}", root.display());
    println!("cargo:libdir={dir_s}");
    println!("cargo:include={}", include.display());
    println!("cargo:static={}", if link_static { 1 } else { 0 });
}
