//! Finds libmoas and links it; no dependencies.
//!
//! Where: `MOAS_LIB_DIR` if set, else what `pkg-config --variable=libdir moas` says
//! (`PKG_CONFIG` names another pkg-config), else this source tree's `lib/`.
//!
//! How: the shared library (`-l dylib=moas`) by default. With the `static` feature (or
//! `MOAS_STATIC=1`), libmoas.a, plus its private libraries: what
//! `pkg-config --static --libs moas` lists, or the `Libs.private` line of the `moas.pc`
//! beside the library, or `-lm` and `-fopenmp` when the archive calls OpenMP. `-fopenmp`
//! becomes the runtime the archive calls: libgomp for GCC's `GOMP_` calls, libomp for
//! clang's `__kmpc_` calls (in the directory clang itself passes for it), none when
//! it calls neither.
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The OpenMP runtime libmoas.a calls into, if any.
fn openmp_runtime(archive: &Path) -> Option<&'static str> {
    let bytes = fs::read(archive).ok()?;
    if contains(&bytes, b"__kmpc_") {
        Some("omp")
    } else if contains(&bytes, b"GOMP_") {
        Some("gomp")
    } else {
        None
    }
}

/// The directory of libomp.so when the linker would not find it: clang keeps it in its
/// own lib/ (Debian: /usr/lib/llvm-N/lib) and passes that directory when it links with
/// -fopenmp, which `clang -### -fopenmp` shows.
fn libomp_dir() -> Option<PathBuf> {
    let mut compilers = Vec::new();
    if let Ok(cc) = env::var("CC") {
        compilers.push(cc);
    }
    compilers.push("clang".to_string());
    compilers.into_iter().find_map(|cc| {
        let out = Command::new(cc)
            .args([
                "-###",
                "-fopenmp",
                "-x",
                "c",
                "/dev/null",
                "-o",
                "/dev/null",
            ])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.split_whitespace()
            .filter_map(|arg| arg.trim_matches('"').strip_prefix("-L").map(PathBuf::from))
            .find(|dir| dir.join("libomp.so").exists())
    })
}

fn main() {
    for var in [
        "MOAS_LIB_DIR",
        "MOAS_STATIC",
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
        "CC",
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
        let private = private.unwrap_or_else(|| {
            let mut flags = vec!["-lm".to_string()];
            if openmp_runtime(&archive).is_some() {
                flags.push("-fopenmp".to_string());
            }
            flags
        });
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
            } else if flag == "-fopenmp" || flag.starts_with("-fopenmp=") {
                // the runtime the archive calls (none: a moas.pc older than the archive)
                if let Some(runtime) = openmp_runtime(&archive) {
                    libs.push(runtime.to_string());
                }
            }
        }
        if libs.iter().any(|l| l == "omp") {
            if let Some(omp) = libomp_dir() {
                println!("cargo:rustc-link-search=native={}", omp.display());
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
