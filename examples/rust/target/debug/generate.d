/work/main/examples/rust/target/debug/generate: /work/main/examples/rust/build.rs /work/main/examples/rust/src/lib.rs /work/main/examples/rust/src/main.rs /work/main/lib/libmoas.so
