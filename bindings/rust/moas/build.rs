//! The library moas-sys linked is in DEP_MOAS_LIBDIR; when it is the shared one, this
//! crate's own tests and examples get that directory as their rpath, so they run in
//! place. A crate that depends on moas-sys does the same for its binaries (see
//! tests/rust-consumer/build.rs): a build script's link arguments reach only its own
//! crate's targets.
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MOAS_LIBDIR");
    println!("cargo:rerun-if-env-changed=DEP_MOAS_STATIC");
    if env::var("DEP_MOAS_STATIC").as_deref() != Ok("1") {
        if let Ok(dir) = env::var("DEP_MOAS_LIBDIR") {
            println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{dir}");
            println!("cargo:rustc-link-arg-examples=-Wl,-rpath,{dir}");
        }
    }
}
