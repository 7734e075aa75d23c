//! moas-sys reports where the library it linked is (DEP_MOAS_LIBDIR) and whether it
//! linked it statically (DEP_MOAS_STATIC). The shared library must also be found at
//! run time, and moas-sys's own link arguments do not reach this crate's binary, so
//! the rpath is added here, as the moas-sys documentation says a dependent does.
//! RUST_CONSUMER_NO_RPATH=1 leaves it out (the test shows the binary then fails to load).
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=RUST_CONSUMER_NO_RPATH");
    let linked_static = env::var("DEP_MOAS_STATIC").as_deref() == Ok("1");
    let no_rpath = env::var("RUST_CONSUMER_NO_RPATH").as_deref() == Ok("1");
    if !linked_static && !no_rpath {
        let dir = env::var("DEP_MOAS_LIBDIR").expect("moas-sys sets DEP_MOAS_LIBDIR");
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
}
