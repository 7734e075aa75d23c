//! Where libmoas is: `MOAS_LIB_DIR` if set, else what `pkg-config --variable=libdir moas`
//! says, else this source tree's `lib/`. The crate links the shared library, and the
//! directory goes into the rpath of every binary and test, so they run in place.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn pkg_config_libdir() -> Option<String> {
    let out = Command::new("pkg-config")
        .args(["--variable=libdir", "moas"])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !dir.is_empty()).then_some(dir)
}

fn main() {
    println!("cargo:rerun-if-env-changed=MOAS_LIB_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    println!("cargo:rerun-if-changed=build.rs");

    let (dir, how) = match env::var("MOAS_LIB_DIR") {
        Ok(dir) if !dir.is_empty() => (dir, "MOAS_LIB_DIR"),
        _ => match pkg_config_libdir() {
            Some(dir) => (dir, "pkg-config"),
            None => {
                let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
                let lib = manifest.join("../../lib");
                let lib = lib.canonicalize().unwrap_or(lib);
                (lib.to_string_lossy().into_owned(), "the source tree")
            }
        },
    };
    println!("cargo:rerun-if-changed={dir}/libmoas.so");
    println!("cargo:rustc-env=MOAS_LINKED_FROM={how}: {dir}");
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-lib=dylib=moas");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
}
