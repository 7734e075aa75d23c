//! generate - generate text from a prompt with the safe wrappers of the moas crate.
//!
//!     cd bindings/rust
//!     cargo run --offline --example generate -- ../../models/moas-kjv.gguf "And God said" 200 [routed]
//!
//! Prints the text, then the routing and KV bytes to stderr; exit status 1 on an error.
use moas::{Context, ContextParams, Mode, Model, Sampler, SamplerParams};
use std::process::ExitCode;

fn generate(path: &str, prompt: &str, n: usize, mode: Mode) -> moas::Result<String> {
    let model = Model::load(path)?;
    let mut ctx = Context::new(
        &model,
        &ContextParams {
            mode,
            ..Default::default()
        },
    )?;
    let params = SamplerParams {
        temperature: 0.8,
        seed: 1,
        ..Default::default()
    };
    let mut sampler = Sampler::new(model.n_vocab(), &params)?;

    ctx.decode_batch(&model.tokenize(prompt)?)?;
    let mut text = prompt.to_string();
    for _ in 0..n {
        if ctx.n_past() == ctx.n_ctx() {
            break;
        }
        let logits = match ctx.logits() {
            Some(logits) => logits, // the library's buffer, read in place
            None => break,          // an empty prompt: nothing to sample from
        };
        let token = sampler.sample(logits)?;
        text.push_str(model.token_text(token).unwrap_or("\u{fffd}"));
        ctx.decode(token)?; // needs &mut ctx: `logits` cannot outlive this line
    }
    eprintln!(
        "routing: {:?} token-layers per scheme, KV bytes {}",
        ctx.scheme_counts(-1)?,
        ctx.kv_bytes_used(-1)
    );
    Ok(text)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: {} MODEL [PROMPT] [N] [routed]", args[0]);
        return ExitCode::from(2);
    }
    let prompt = args.get(2).map_or("In the beginning", String::as_str);
    let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let mode = if args.get(4).map(String::as_str) == Some("routed") {
        Mode::Routed
    } else {
        Mode::Mixture
    };
    match generate(&args[1], prompt, n, mode) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
