//! What the integration tests share: the tiny test model and a text it knows.
#![allow(dead_code)] // each test crate uses its own part

use moas::Model;

pub const TEXT: &str = "And God said, Let there be light: and there was light.";

pub fn data(name: &str) -> String {
    format!(
        "{}/../../../tests/data/{}",
        env!("CARGO_MANIFEST_DIR"),
        name
    )
}

pub fn model() -> Model {
    Model::load(data("tiny-moas-bias.gguf")).expect("the test model loads")
}
