/work/main/examples/rust/target/debug/deps/api-720c015d99241463.d: tests/api.rs

/work/main/examples/rust/target/debug/deps/api-720c015d99241463: tests/api.rs

tests/api.rs:

# env-dep:CARGO_MANIFEST_DIR=/work/main/examples/rust
# env-dep:MOAS_LINKED_FROM=MOAS_LIB_DIR: /work/main/lib
