/work/main/examples/rust/target/debug/deps/moas-44b1ba5db12e7ce3.d: src/lib.rs

/work/main/examples/rust/target/debug/deps/libmoas-44b1ba5db12e7ce3.rlib: src/lib.rs

/work/main/examples/rust/target/debug/deps/libmoas-44b1ba5db12e7ce3.rmeta: src/lib.rs

src/lib.rs:
