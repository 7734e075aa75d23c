/work/main/examples/rust/target/debug/libmoas.rlib: /work/main/examples/rust/build.rs /work/main/examples/rust/src/lib.rs /work/main/lib/libmoas.so
