/work/main/examples/rust/target/debug/deps/generate-7327d68cac3702bf.d: src/main.rs

/work/main/examples/rust/target/debug/deps/generate-7327d68cac3702bf: src/main.rs

src/main.rs:
