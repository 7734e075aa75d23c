//! rust-consumer MODEL [PROMPT] [N]: load MODEL, decode PROMPT, then N greedy tokens,
//! and print the text; how the library was linked goes to stderr.
use moas::{Context, ContextParams, Model, Sampler, SamplerParams};
use std::process::ExitCode;

fn run(path: &str, prompt: &str, n: usize) -> moas::Result<String> {
    let model = Model::load(path)?;
    let mut ctx = Context::new(&model, &ContextParams::default())?;
    let greedy = SamplerParams {
        temperature: 0.0,
        ..Default::default()
    };
    let mut sampler = Sampler::new(model.n_vocab(), &greedy)?;
    ctx.decode_batch(&model.tokenize(prompt)?)?;
    let mut ids = Vec::new();
    while ids.len() < n && ctx.n_past() < ctx.n_ctx() {
        let token = match ctx.logits() {
            Some(logits) => sampler.sample(logits)?,
            None => break,
        };
        ids.push(token);
        ctx.decode(token)?;
    }
    Ok(format!("{prompt}{}", model.detokenize(&ids)?))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: {} MODEL [PROMPT] [N]", args[0]);
        return ExitCode::from(2);
    }
    let prompt = args.get(2).map_or("And God", String::as_str);
    let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    eprintln!("libmoas {} ({})", moas::version(), moas::ffi::LINKED_FROM);
    match run(&args[1], prompt, n) {
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
