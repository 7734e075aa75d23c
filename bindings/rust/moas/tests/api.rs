//! The safe wrappers on the tiny test model: load, decode, tokenizer, routed mode, errors.
use moas::{
    find_stop, Context, ContextParams, ErrorKind, Kernels, KvType, Logits, Mode, Model, Pool,
    PoolParams, Sampler, SamplerParams, Stop,
};

mod common;
use common::{data, model, TEXT};

#[test]
fn links_the_library_build_rs_found() {
    let from = moas::ffi::LINKED_FROM;
    assert!(from.contains(": /"), "{from}");
    assert_eq!(moas::version().split('.').next(), Some("1"));
}

#[test]
fn load_reports_hyperparameters() {
    let m = model();
    assert_eq!(m.name(), "tiny-moas-bias");
    assert_eq!(
        (m.n_layer(), m.n_head(), m.head_dim(), m.n_vocab()),
        (2, 6, 8, 47)
    );
    assert_eq!(m.n_ctx_train(), 64);
    assert_eq!(m.schemes(), vec![6, 2, 1]);
    assert_eq!(m.meta_int("moas.block_count"), Ok(2));
    let bytes = std::fs::read(data("tiny-moas-bias.gguf")).unwrap();
    let from_memory = Model::from_bytes(bytes).unwrap();
    assert_eq!(from_memory.schemes(), m.schemes());
}

#[test]
fn decode_one_by_one_equals_batch() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let mut a = Context::new(&m, &ContextParams::default()).unwrap();
    let mut b = Context::new(
        &m,
        &ContextParams {
            n_threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(a.logits().is_none());
    a.decode_batch(&ids).unwrap();
    for &t in &ids {
        b.decode(t).unwrap();
    }
    assert_eq!(a.n_past(), ids.len() as i32);
    let (la, lb) = (a.logits().unwrap(), b.logits().unwrap());
    assert_eq!(la.len(), 47);
    assert_eq!(la, lb);
    assert!(la.iter().all(|x| x.is_finite()));

    // truncate, then decode again: the same as never having gone further
    let keep = 10;
    a.truncate(keep).unwrap();
    assert!(a.logits().is_none());
    a.decode_batch(&ids[keep as usize..]).unwrap();
    assert_eq!(a.logits().unwrap(), b.logits().unwrap());
    a.reset();
    assert_eq!(a.n_past(), 0);
}

#[test]
fn tokenize_round_trip() {
    let m = model();
    let text = std::fs::read_to_string(data("tiny.txt")).unwrap();
    let ids = m.tokenize(&text).unwrap();
    assert_eq!(ids.len(), text.chars().count());
    assert_eq!(m.detokenize(&ids).unwrap(), text);
    assert_eq!(m.token_text(m.tokenize("é").unwrap()[0]), Some("é"));
    assert_eq!(m.token_text(47), None);
    assert_eq!(m.tokenize("").unwrap(), Vec::<i32>::new());
}

#[test]
fn routed_mode_counts_and_kv_bytes() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let n = ids.len() as i32;
    for (kv_type, elem) in [(KvType::F32, 4), (KvType::F16, 2)] {
        let p = ContextParams {
            mode: Mode::Routed,
            kv_type,
            ..Default::default()
        };
        let mut ctx = Context::new(&m, &p).unwrap();
        ctx.decode_batch(&ids).unwrap();
        let counts = ctx.scheme_counts(-1).unwrap();
        assert_eq!(counts.iter().sum::<i32>(), 2 * n);
        assert_eq!(ctx.scheme_counts(0).unwrap().iter().sum::<i32>(), n);
        // docs/KV_CACHE.md: stored heads * head_dim * 2 * element size + 5 per token-layer
        let routes = ctx.routes(0, n).unwrap();
        let heads: i32 = routes.kv_heads.iter().sum();
        assert_eq!(
            ctx.kv_bytes_used(-1),
            heads as usize * 8 * 2 * elem + 5 * 2 * n as usize
        );
        let by_count: i32 = counts.iter().zip([6, 2, 1]).map(|(c, h)| c * h).sum();
        assert_eq!(heads, by_count);
        assert!(routes
            .gates
            .chunks(3)
            .all(|g| (g.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    }

    let p = ContextParams {
        mode: Mode::Routed,
        forced_scheme: Some(2),
        ..Default::default()
    };
    let mut mqa = Context::new(&m, &p).unwrap();
    mqa.decode_batch(&ids).unwrap();
    assert_eq!(mqa.scheme_counts(-1).unwrap(), vec![0, 0, 2 * n]);
    mqa.force_scheme(None).unwrap();
}

#[test]
fn errors_carry_status_and_message() {
    let e = Model::load("/nonexistent/model.gguf").unwrap_err();
    assert_eq!((e.status, e.name()), (-3, "MOAS_ERR_IO"));
    assert!(
        e.message.contains("/nonexistent/model.gguf"),
        "{}",
        e.message
    );
    assert!(e
        .to_string()
        .starts_with("MOAS_ERR_IO (cannot read the model file): "));

    let m = model();
    let e = m.tokenize("Quiz").unwrap_err();
    assert_eq!(e.name(), "MOAS_ERR_UNKNOWN_CHAR");
    assert!(e.message.contains("U+0051"), "{}", e.message);
    assert_eq!(
        m.meta_int("general.name").unwrap_err().name(),
        "MOAS_ERR_WRONG_TYPE"
    );

    let mut ctx = Context::new(
        &m,
        &ContextParams {
            n_ctx: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ctx.decode(47).unwrap_err().name(), "MOAS_ERR_INVALID_ARG");
    ctx.decode_batch(&[1, 2]).unwrap();
    assert_eq!(ctx.decode(3).unwrap_err().name(), "MOAS_ERR_CONTEXT_FULL");
    assert_eq!(ctx.n_past(), 2); // a failed call changes nothing
    assert_eq!(ctx.force_scheme(Some(0)).unwrap_err().status, -1); // mixture mode
    let too_long = ContextParams {
        n_ctx: 65,
        ..Default::default()
    };
    assert_eq!(Context::new(&m, &too_long).unwrap_err().status, -1);

    let mut s = Sampler::new(47, &SamplerParams::default()).unwrap();
    assert!(s.sample(&[0.0; 3]).is_err());
    let no_mass = SamplerParams {
        top_p: 0.0,
        ..Default::default()
    };
    assert_eq!(Sampler::new(47, &no_mass).unwrap_err().status, -1);
    assert_eq!(Pool::new(&m, 0, KvType::F32).unwrap_err().status, -1);
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    assert_eq!(pool.context(&too_long).unwrap_err().status, -1);
}

#[test]
fn debug_shows_what_each_object_is() {
    let m = model();
    assert_eq!(
        format!("{m:?}"),
        r#"Model { name: "tiny-moas-bias", n_vocab: 47, n_layer: 2, n_scheme: 3 }"#
    );
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let mut ctx = Context::new(&m, &routed).unwrap();
    ctx.decode_batch(&[1, 2, 3]).unwrap();
    assert_eq!(ctx.mode(), Mode::Routed);
    assert_eq!(
        format!("{ctx:?}"),
        format!(
            "Context {{ n_past: 3, n_ctx: 64, mode: Routed, kernels: {:?}, \
             route_callback: false, abort_callback: false }}",
            ctx.kernels_name()
        )
    );
    assert!(!ctx.kernels_name().is_empty());
    ctx.set_route_callback(|_| None);
    assert!(format!("{ctx:?}").ends_with("route_callback: true, abort_callback: false }"));
    ctx.set_abort_callback(|| false);
    assert!(format!("{ctx:?}").ends_with("abort_callback: true }"));
    let mixture = Context::new(&m, &ContextParams::default()).unwrap();
    assert_eq!(mixture.mode(), Mode::Mixture);
    assert!(format!("{mixture:?}").contains("n_past: 0, n_ctx: 64, mode: Mixture"));

    let s = Sampler::new(47, &SamplerParams::default()).unwrap();
    assert_eq!(format!("{s:?}"), "Sampler { n_vocab: 47 }");

    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut a = pool.context(&routed).unwrap();
    a.decode(1).unwrap();
    let stats = pool.stats();
    assert_eq!(stats.n_contexts, 1);
    assert_eq!(
        format!("{pool:?}"),
        format!("Pool {{ model: \"tiny-moas-bias\", stats: {stats:?} }}")
    );
    assert!(format!("{pool:?}").contains("n_contexts: 1"));
}

#[test]
fn sampler_is_greedy_at_zero_and_seeded_otherwise() {
    let m = model();
    let mut ctx = Context::new(&m, &ContextParams::default()).unwrap();
    ctx.decode_batch(&m.tokenize("And God").unwrap()).unwrap();
    let logits = ctx.logits().unwrap();
    let argmax = (0..47)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as i32;
    let mut greedy = Sampler::new(
        47,
        &SamplerParams {
            temperature: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(greedy.sample(logits).unwrap(), argmax);

    let p = SamplerParams {
        seed: 9,
        ..Default::default()
    };
    let (mut a, mut b) = (Sampler::new(47, &p).unwrap(), Sampler::new(47, &p).unwrap());
    let xs: Vec<i32> = (0..20).map(|_| a.sample(logits).unwrap()).collect();
    let ys: Vec<i32> = (0..20).map(|_| b.sample(logits).unwrap()).collect();
    assert_eq!(xs, ys);
    a.reseed(9);
    assert_eq!(a.sample(logits).unwrap(), xs[0]);
}

#[test]
fn tokenize_lenient_replaces_or_drops() {
    let m = model();
    let (a, n, d, sp, nl) = (11, 33, 24, 1, 0); // 'A' 'n' 'd' ' ' '\n' in tiny.txt's vocabulary
    assert!(m.tokenize("And Q7\r\n").is_err());
    assert_eq!(
        m.tokenize_lenient("And Q7\r\n", Some(sp)).unwrap(),
        (vec![a, n, d, sp, sp, sp, sp, nl], 3)
    );
    assert_eq!(
        m.tokenize_lenient("And Q7\r\n", None).unwrap(),
        (vec![a, n, d, sp, nl], 3)
    );
    assert_eq!(m.tokenize_lenient("And", Some(47)).unwrap_err().status, -1);
}

#[test]
fn sampler_bias_and_repeat_penalty_hand_computed() {
    let logits = [2.0f32, 3.0, -1.0, 2.5];
    let mut s = Sampler::new(
        4,
        &SamplerParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..Default::default()
        },
    )
    .unwrap();
    // its own choices, the last two: 3/2 < 2.5; 1.5 and 1.25 < 2; 1 has left the window
    let picks: Vec<i32> = (0..4).map(|_| s.sample(&logits).unwrap()).collect();
    assert_eq!(picks, vec![1, 3, 0, 1]);
    s.reset();
    s.accept(1).unwrap();
    assert_eq!(s.sample(&logits).unwrap(), 3);
    let mut b = Sampler::new(
        4,
        &SamplerParams {
            temperature: 0.0,
            logit_bias: vec![(1, f32::NEG_INFINITY), (3, -1.0)],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(b.sample(&logits).unwrap(), 0); // 2.5 - 1 < 2
}

#[test]
fn sampler_frequency_and_presence_penalties_hand_computed() {
    let logits = [2.0f32, 1.6, 1.0, -9.0];
    let greedy = |frequency_penalty: f32, presence_penalty: f32| {
        Sampler::new(
            4,
            &SamplerParams {
                temperature: 0.0,
                frequency_penalty,
                presence_penalty,
                ..Default::default()
            },
        )
        .unwrap()
    };
    // frequency: 2 - 0.25 > 1.6; 2 - 0.5 < 1.6; 1.5 > 1.6 - 0.25; 2 - 0.75 < 1.35
    let mut f = greedy(0.25, 0.0);
    f.accept(0).unwrap();
    let picks: Vec<i32> = (0..4).map(|_| f.sample(&logits).unwrap()).collect();
    assert_eq!(picks, vec![0, 1, 0, 1]);
    // presence, once however often: 2 - 0.5 < 1.6, 2 - 0.3 > 1.6
    for (presence, want) in [(0.5f32, 1), (0.3, 0)] {
        let mut p = greedy(0.0, presence);
        for _ in 0..3 {
            p.accept(0).unwrap();
        }
        assert_eq!(p.sample(&logits).unwrap(), want);
    }
    let bad = SamplerParams {
        frequency_penalty: f32::NAN,
        ..Default::default()
    };
    assert_eq!(
        Sampler::new(4, &bad).unwrap_err().kind(),
        ErrorKind::InvalidArg
    );
}

#[test]
fn pool_decode_fork_and_state_equal_decoding_alone() {
    let m = model();
    let prompt = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut a = pool.context(&routed).unwrap();
    let mut b = pool.context(&routed).unwrap();
    pool.decode(&mut [(&mut a, &prompt[..20]), (&mut b, &prompt[..7])])
        .unwrap();
    let mut alone = Context::new(&m, &routed).unwrap();
    alone.decode_batch(&prompt[..20]).unwrap();
    assert_eq!(a.logits(), alone.logits());

    // a fork continues like the parent would; a saved state loads into another context
    let mut f = a.fork().unwrap();
    assert_eq!(f.n_past(), 20);
    let state = a.save_state().unwrap();
    f.decode_batch(&prompt[20..30]).unwrap();
    alone.decode_batch(&prompt[20..30]).unwrap();
    assert_eq!(f.logits(), alone.logits());
    b.load_state(&state).unwrap();
    b.decode_batch(&prompt[20..30]).unwrap();
    assert_eq!(b.logits(), alone.logits());
    assert!(b.load_state(&state[..state.len() - 1]).is_err());
    assert_eq!(b.n_past(), 30);
    assert_eq!(pool.stats().n_contexts, 3);
    assert!(b.kv_pages() > 0);
}

#[test]
fn pool_params_compaction_and_shift() {
    // pages of 8 heads, one thread, committed: the figures say so
    let m = Model::load(data("tiny-modern-pooled-nobias.gguf")).unwrap();
    let pp = PoolParams {
        capacity_bytes: 1 << 20,
        page_heads: 8,
        n_threads: 1,
        commit: true,
        ..Default::default()
    };
    let pool = Pool::with_params(&m, &pp).unwrap();
    let st = pool.stats();
    assert_eq!(st.page_heads, 8);
    assert_eq!(st.n_threads, 1);
    assert_eq!(st.page_bytes, 8 * m.head_dim() as u64 * 2 * 4);
    assert_eq!(st.bytes_capacity, st.page_bytes * st.n_pages as u64);
    assert!(Pool::with_params(
        &m,
        &PoolParams {
            page_heads: 3,
            ..pp.clone()
        }
    )
    .is_err());

    // every token on MHA, then the first 20 pooled down to MQA: fewer pages, 20 tokens
    // in each of the 2 layers changed, and decoding goes on
    let routed = ContextParams {
        mode: Mode::Routed,
        forced_scheme: Some(0),
        ..Default::default()
    };
    let ids = m.tokenize(TEXT).unwrap();
    let mut c = pool.context(&routed).unwrap();
    c.decode_batch(&ids[..30]).unwrap();
    let before = c.kv_pages();
    assert_eq!(c.compact(20, 2).unwrap(), 20 * m.n_layer());
    assert!(c.kv_pages() < before);
    assert_eq!(
        pool.stats().bytes_stored,
        (10 * 6 + 20) * m.n_layer() as u64 * 2 * 8 * 4
    );
    c.decode(ids[30]).unwrap();

    // a RoPE model shifts: 10 tokens after the first 4 go, the rest move down
    c.shift(4, 10).unwrap();
    assert_eq!(c.n_past(), 21);
    c.decode(ids[31]).unwrap();
    assert!(c.logits().unwrap().iter().all(|x| x.is_finite()));
    assert!(c.shift(4, 100).is_err());
    assert_eq!(c.n_past(), 22);
    // a learned-position model refuses
    let lm = model();
    let mut l = Context::new(&lm, &ContextParams::default()).unwrap();
    l.decode_batch(&lm.tokenize(TEXT).unwrap()[..10]).unwrap();
    assert!(l.shift(2, 3).is_err());
}

#[test]
fn routes_outside_the_stored_tokens_are_an_error_not_an_allocation() {
    let m = model();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let mut c = Context::new(&m, &routed).unwrap();
    c.decode(m.tokenize("A").unwrap()[0]).unwrap();
    // sized from n_pos before the library's check, these asked for 51 GB and aborted
    for (pos, n_pos) in [
        (0, i32::MAX),
        (0, 2),
        (-1, 1),
        (1, 1),
        (0, -1),
        (i32::MAX, 1),
    ] {
        let e = c.routes(pos, n_pos).unwrap_err();
        assert_eq!(e.name(), "MOAS_ERR_INVALID_ARG", "{pos} {n_pos}: {e}");
        assert!(e.message.contains("routes"), "{e}");
    }
    let r = c.routes(0, 1).unwrap();
    assert_eq!(r.schemes.len(), m.n_layer() as usize);
    assert_eq!(r.gates.len(), m.n_layer() as usize * m.schemes().len());
}

#[test]
fn batched_logits_every_token_last_or_none() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let n_vocab = m.n_vocab() as usize;
    let mut one = Context::new(&m, &ContextParams::default()).unwrap();
    let mut each = Vec::new();
    for &t in &ids[..12] {
        one.decode(t).unwrap();
        each.extend_from_slice(one.logits().unwrap());
    }
    let mut all = Context::new(&m, &ContextParams::default()).unwrap();
    assert_eq!(
        all.decode_batch_logits(&ids[..12], Logits::All).unwrap(),
        each
    );
    let mut none = Context::new(&m, &ContextParams::default()).unwrap();
    assert!(none
        .decode_batch_logits(&ids[..11], Logits::None)
        .unwrap()
        .is_empty());
    assert_eq!(none.n_past(), 11);
    let last = none
        .decode_batch_logits(&ids[11..12], Logits::Last)
        .unwrap();
    assert_eq!(last, &each[11 * n_vocab..]);
    assert_eq!(none.logits().unwrap(), &last[..]);
    assert!(none
        .decode_batch_logits(&[], Logits::Last)
        .unwrap()
        .is_empty());
    // a bad token: an error, nothing stored
    assert!(none.decode_batch_logits(&[0, 1000], Logits::All).is_err());
    assert_eq!(none.n_past(), 12);

    // in a pool: each context gets what it asked for, as decoding alone gives it
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut a = pool.context(&ContextParams::default()).unwrap();
    let mut b = pool.context(&ContextParams::default()).unwrap();
    let mut c = pool.context(&ContextParams::default()).unwrap();
    let outs = pool
        .decode_logits(&mut [
            (&mut a, &ids[..12], Logits::All),
            (&mut b, &ids[..5], Logits::Last),
            (&mut c, &ids[..3], Logits::None),
        ])
        .unwrap();
    assert_eq!(outs[0], each);
    assert_eq!(outs[1], &each[4 * n_vocab..5 * n_vocab]);
    assert!(outs[2].is_empty());
    assert_eq!(c.logits(), None);
    assert_eq!((a.n_past(), b.n_past(), c.n_past()), (12, 5, 3));
}

#[test]
fn a_pool_is_shared_between_threads() {
    fn shared<T: Sync + Send>(_: &T) {}
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    shared(&pool);
    let mut a = pool.context(&ContextParams::default()).unwrap();
    std::thread::scope(|s| {
        // stats and a new context from another thread while this one decodes
        let watcher = s.spawn(|| {
            let mut b = pool.context(&ContextParams::default()).unwrap();
            b.decode_batch(&ids[..4]).unwrap();
            (pool.stats().n_contexts, b.n_past())
        });
        pool.decode(&mut [(&mut a, &ids[..8])]).unwrap();
        let (n_contexts, n_past) = watcher.join().unwrap();
        assert!(n_contexts >= 2);
        assert_eq!(n_past, 4);
    });
    let mut alone = Context::new(&m, &ContextParams::default()).unwrap();
    alone.decode_batch(&ids[..8]).unwrap();
    assert_eq!(a.logits(), alone.logits());
}

#[test]
fn every_tokens_logits_of_too_many_tokens_fail_before_allocating() {
    // 2 x 10^8 tokens' logits would be 37 GB: the context's room is checked first
    let m = model();
    let tokens = vec![0i32; 200_000_000]; // zeroed pages, never touched
    let mut ctx = Context::new(&m, &ContextParams::default()).unwrap();
    let e = ctx.decode_batch_logits(&tokens, Logits::All).unwrap_err();
    assert_eq!(e.name(), "MOAS_ERR_CONTEXT_FULL");
    assert_eq!(ctx.n_past(), 0);
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut c = pool.context(&ContextParams::default()).unwrap();
    let e = pool
        .decode_logits(&mut [(&mut c, &tokens[..], Logits::All)])
        .unwrap_err();
    assert_eq!(e.name(), "MOAS_ERR_CONTEXT_FULL");
    // the message names the call and the sequence that does not fit, not decode_batch
    let mut d = pool.context(&ContextParams::default()).unwrap();
    let e = pool
        .decode_logits(&mut [
            (&mut d, &tokens[..1], Logits::All),
            (&mut c, &tokens[..], Logits::All),
        ])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ContextFull);
    assert!(e.message.starts_with("pool decode: sequence 1: "), "{e}");
    assert!(ctx
        .decode_batch_logits(&tokens, Logits::All)
        .unwrap_err()
        .message
        .starts_with("decode_batch: "));
}

#[test]
fn a_refused_state_is_not_called_a_model_file() {
    let m = model();
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut c = pool.context(&ContextParams::default()).unwrap();
    for state in [&b""[..], &b"not a state at all"[..]] {
        let e = c.load_state(state).unwrap_err();
        assert_eq!(e.name(), "MOAS_ERR_BAD_FORMAT");
        assert!(!e.to_string().contains("GGUF"), "{e}");
    }
}

#[test]
fn a_path_need_not_be_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::env::temp_dir().join(format!("moas-rust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(std::ffi::OsStr::from_bytes(b"m\xe9.gguf"));
    std::fs::copy(data("tiny-moas-bias.gguf"), &path).unwrap();
    let loaded = Model::load(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(loaded.unwrap().n_layer(), 2);
}

#[test]
fn route_callback_steers_routed_mode_and_sees_every_token_and_layer() {
    use std::sync::{Arc, Mutex};
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        n_threads: 1,
        ..Default::default()
    };
    let mqa = m.n_scheme() - 1; // schemes [6, 2, 1]: the last keeps one head
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut ctx = Context::new(&m, &routed).unwrap();
    let log = Arc::clone(&seen);
    ctx.set_route_callback(move |e| {
        assert_eq!(e.gates.len(), 3);
        assert!((e.gates.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        log.lock().unwrap().push((e.pos, e.layer));
        Some(mqa)
    });
    ctx.decode_batch(&ids[..10]).unwrap();
    for &t in &ids[10..20] {
        ctx.decode(t).unwrap();
    }
    let routes = ctx.routes(0, 20).unwrap();
    assert!(
        routes.kv_heads.iter().all(|&h| h == 1),
        "{:?}",
        routes.kv_heads
    );
    // every (position, layer) once; a batch goes layer by layer, one token each after
    let mut got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 20 * 2);
    got.sort();
    let want: Vec<(i32, i32)> = (0..20).flat_map(|p| (0..2).map(move |l| (p, l))).collect();
    assert_eq!(got, want);

    // the same through the forced scheme, bit for bit; None keeps the router's choice
    let mut forced = Context::new(
        &m,
        &ContextParams {
            forced_scheme: Some(mqa),
            ..routed.clone()
        },
    )
    .unwrap();
    forced.decode_batch(&ids[..20]).unwrap();
    assert_eq!(ctx.logits(), forced.logits());
    let mut keep = Context::new(&m, &routed).unwrap();
    keep.set_route_callback(|_| None);
    let mut plain = Context::new(&m, &routed).unwrap();
    keep.decode_batch(&ids[..20]).unwrap();
    plain.decode_batch(&ids[..20]).unwrap();
    assert_eq!(keep.logits(), plain.logits());
    assert_eq!(
        keep.routes(0, 20).unwrap().schemes,
        plain.routes(0, 20).unwrap().schemes
    );
    keep.clear_route_callback();
    keep.decode(ids[20]).unwrap();
}

#[test]
fn route_callback_panic_resumes_after_the_call() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let mut ctx = Context::new(&m, &ContextParams::default()).unwrap();
    ctx.set_route_callback(move |e| {
        counter.fetch_add(1, Ordering::SeqCst);
        if e.pos == 3 {
            panic!("no position 3");
        }
        None
    });
    ctx.decode_batch(&ids[..3]).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.decode(ids[3])));
    let message = caught
        .expect_err("the panic comes back")
        .downcast::<&str>()
        .unwrap();
    assert_eq!(*message, "no position 3");
    assert_eq!(ctx.n_past(), 4); // the token was decoded, its proposed scheme kept
    assert_eq!(calls.load(Ordering::SeqCst), 3 * 2 + 1); // not called again in that call
    ctx.decode(ids[4]).unwrap(); // and afterwards as before
    assert_eq!(calls.load(Ordering::SeqCst), 3 * 2 + 1 + 2);
}

#[test]
fn route_callbacks_in_a_pool_call_and_forks_without_them() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let mut a = pool.context(&routed).unwrap();
    let mut b = pool.context(&routed).unwrap();
    a.set_route_callback(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Some(0)
    });
    pool.decode(&mut [(&mut a, &ids[..8]), (&mut b, &ids[..5])])
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 8 * 2);
    assert!(a.routes(0, 8).unwrap().kv_heads.iter().all(|&h| h == 6));
    let mut child = a.fork().unwrap();
    drop(a); // the child must not call the parent's closure, nor its freed hook
    child.decode(ids[8]).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 8 * 2);
    // a panic in one context's callback of a pool call comes back once
    b.set_route_callback(|_| panic!("b"));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.decode(&mut [(&mut child, &ids[9..10]), (&mut b, &ids[5..6])])
    }));
    assert!(caught.is_err());
    assert_eq!((child.n_past(), b.n_past()), (10, 6));
    // two panics in one pool call: the first resumes, and neither comes back later (b's
    // callback, kept, panics only once)
    child.set_route_callback(|_| panic!("child"));
    let mut panicked = false;
    b.set_route_callback(move |_| {
        if !panicked {
            panicked = true;
            panic!("b once");
        }
        None
    });
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.decode(&mut [(&mut child, &ids[10..11]), (&mut b, &ids[6..7])])
    }));
    assert_eq!(*caught.unwrap_err().downcast::<&str>().unwrap(), "child");
    child.clear_route_callback();
    pool.decode(&mut [(&mut child, &ids[11..12]), (&mut b, &ids[7..8])])
        .unwrap();
    b.decode(ids[8]).unwrap();
    assert_eq!((child.n_past(), b.n_past()), (12, 9));
}

/// What a stopped call must leave as it was: position, stored bytes, scheme counts.
fn held(ctx: &Context<'_>) -> (i32, usize, Vec<i32>) {
    (
        ctx.n_past(),
        ctx.kv_bytes_used_total(),
        ctx.scheme_counts_total().unwrap(),
    )
}

#[test]
fn abort_callback_stops_a_decode_at_each_ask_and_loses_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut ctx = pool.context(&routed).unwrap();
    let mut never = pool.context(&routed).unwrap();
    ctx.decode_batch(&ids[..4]).unwrap();
    never.decode_batch(&ids[..4]).unwrap();
    let want = never.decode_batch_logits(&ids[4..24], Logits::All).unwrap();
    // asked before the block and between its 2 layers; stop at the k-th ask
    let asked = Arc::new(AtomicUsize::new(0));
    let stop_at = Arc::new(AtomicUsize::new(0));
    let (a, s) = (Arc::clone(&asked), Arc::clone(&stop_at));
    ctx.set_abort_callback(move || {
        a.fetch_add(1, Ordering::SeqCst) + 1 == s.load(Ordering::SeqCst)
    });
    let before = held(&ctx);
    let free = pool.stats().pages_free;
    for k in 1..=2 {
        asked.store(0, Ordering::SeqCst);
        stop_at.store(k, Ordering::SeqCst);
        let err = ctx
            .decode_batch_logits(&ids[4..24], Logits::All)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Aborted, "{err}");
        assert_eq!(asked.load(Ordering::SeqCst), k);
        assert_eq!(held(&ctx), before);
        assert_eq!(pool.stats().pages_free, free);
        assert!(ctx.logits().is_none());
    }
    stop_at.store(2, Ordering::SeqCst);
    asked.store(0, Ordering::SeqCst);
    assert_eq!(ctx.decode(ids[4]).unwrap_err().kind(), ErrorKind::Aborted);
    assert_eq!(held(&ctx), before);
    // not stopped: the bits of the context never stopped
    stop_at.store(0, Ordering::SeqCst);
    asked.store(0, Ordering::SeqCst);
    let got = ctx.decode_batch_logits(&ids[4..24], Logits::All).unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert!(
        got.iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == w.to_bits()),
        "not bit for bit"
    );
    assert_eq!(
        ctx.routes(0, 24).unwrap().schemes,
        never.routes(0, 24).unwrap().schemes
    );
    // a fork asks nothing of the parent's closure (it cannot be shared): its own call
    // runs to the end even though the parent's would stop
    stop_at.store(1, Ordering::SeqCst);
    asked.store(0, Ordering::SeqCst);
    let mut child = ctx.fork().unwrap();
    child.decode(ids[24]).unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 0);
    assert_eq!(ctx.decode(ids[24]).unwrap_err().kind(), ErrorKind::Aborted);
    ctx.clear_abort_callback();
    ctx.decode(ids[24]).unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(ctx.logits(), child.logits());
}

#[test]
fn abort_callback_stops_a_whole_pool_decode_and_its_panic_resumes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let mut a = pool.context(&ContextParams::default()).unwrap();
    let mut b = pool.context(&ContextParams::default()).unwrap();
    a.decode_batch(&ids[..3]).unwrap();
    b.decode_batch(&ids[..5]).unwrap();
    let (held_a, held_b, free) = (held(&a), held(&b), pool.stats().pages_free);
    // b's callback stops the call: a, which has none, is undone too
    let stop = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&stop);
    b.set_abort_callback(move || flag.load(Ordering::SeqCst));
    let err = pool
        .decode(&mut [(&mut a, &ids[3..9]), (&mut b, &ids[5..8])])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Aborted);
    assert_eq!((held(&a), held(&b)), (held_a.clone(), held_b.clone()));
    assert_eq!(pool.stats().pages_free, free);
    assert!(a.logits().is_none() && b.logits().is_none());
    // a panic stops the call the same way, then resumes once the library returned
    b.set_abort_callback(|| panic!("stop b"));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.decode(&mut [(&mut a, &ids[3..9]), (&mut b, &ids[5..8])])
    }));
    assert_eq!(*caught.unwrap_err().downcast::<&str>().unwrap(), "stop b");
    assert_eq!((held(&a), held(&b)), (held_a, held_b));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.decode(ids[5])));
    assert_eq!(*caught.unwrap_err().downcast::<&str>().unwrap(), "stop b");
    assert_eq!(b.n_past(), 5);
    // the same call, not stopped: what each context gets decoding alone
    stop.store(false, Ordering::SeqCst);
    let flag = Arc::clone(&stop);
    b.set_abort_callback(move || flag.load(Ordering::SeqCst));
    pool.decode(&mut [(&mut a, &ids[3..9]), (&mut b, &ids[5..8])])
        .unwrap();
    let mut alone = Context::new(&m, &ContextParams::default()).unwrap();
    alone.decode_batch(&ids[..9]).unwrap();
    assert_eq!(a.logits(), alone.logits());
    assert_eq!(b.n_past(), 8);
}

#[test]
fn find_stop_as_the_c_library_hand_computed() {
    let stops = ["\n\n", "", "Amen"];
    let at = |text: &str, more: bool| find_stop(text, &stops, more).unwrap();
    assert_eq!(at("And it was so.\n\nAnd", true), Stop::Found(14)); // the first whole one
    assert_eq!(at("so. Amen.\n\n", true), Stop::Found(4)); // the earlier of two
    assert_eq!(at("so. Am", true), Stop::Show(4)); // "Am" may become "Amen"
    assert_eq!(at("so. Am", false), Stop::Show(6)); // ... unless nothing follows
    assert_eq!(at("so. A\n", true), Stop::Show(5)); // "\n" may become "\n\n"
    assert_eq!(at("so. Ax", true), Stop::Show(6)); // "Ax" cannot
    assert_eq!(at("", true), Stop::Show(0));
    // a whole stop string ends the text at once, though "abcd" began earlier
    let two = vec!["abcd".to_string(), "c".to_string()];
    assert_eq!(find_stop("abc", &two, true), Ok(Stop::Found(2)));
    assert_eq!(find_stop("abc", &two, false), Ok(Stop::Found(2)));
    assert_eq!(find_stop::<&str>("abc", &[], true), Ok(Stop::Show(3)));
    assert_eq!(find_stop("abc", &["a\0b"], true).unwrap_err().status, -1);
    // offsets are bytes, on character boundaries
    assert_eq!(find_stop("dixé Amen", &["Amen"], true), Ok(Stop::Found(6)));
    assert_eq!(find_stop("aé", &["éé"], true), Ok(Stop::Show(1)));
}

#[test]
fn find_stop_in_a_generation_loop() {
    // show what cannot be a stop string yet, one piece at a time; "|" and what was left
    // over when no stop string came
    let stream = |pieces: &[&str]| -> String {
        let (mut shown, mut pending) = (String::new(), String::new());
        for (i, piece) in pieces.iter().enumerate() {
            pending.push_str(piece);
            match find_stop(&pending, &["\n\n", "Amen"], i + 1 < pieces.len()).unwrap() {
                Stop::Found(at) => return shown + &pending[..at],
                Stop::Show(end) => {
                    shown.push_str(&pending[..end]);
                    pending.drain(..end);
                }
            }
        }
        shown + "|" + &pending
    };
    assert_eq!(stream(&["so.", "\n", "\nAnd"]), "so.");
    assert_eq!(stream(&["so. A", "men"]), "so. ");
    assert_eq!(stream(&["so. A", "\n", "x"]), "so. A\nx|");
    assert_eq!(stream(&["so. A", "m"]), "so. Am|");
    assert_eq!(stream(&["é", "A", "mé"]), "éAmé|");
}

#[test]
fn route_table_has_the_shape_of_the_model_and_the_c_records() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let mut ctx = Context::new(&m, &routed).unwrap();
    ctx.decode_batch(&ids[..20]).unwrap();
    let (c_layer, c_scheme) = unsafe {
        (
            moas::ffi::moas_model_n_layer(m.as_ptr()),
            moas::ffi::moas_model_n_scheme(m.as_ptr()),
        )
    };
    assert_eq!((c_layer, c_scheme), (2, 3));

    let t = ctx.route_table(3, 10).unwrap();
    assert_eq!(t.n_tokens(), 10);
    assert_eq!(t.n_layer(), m.n_layer() as usize);
    assert_eq!(t.n_layer(), c_layer as usize);
    assert_eq!(t.n_scheme(), m.n_scheme() as usize);
    assert_eq!(t.n_scheme(), c_scheme as usize);
    assert_eq!(t.shape(), (10, 2, 3));
    assert_eq!(t.first_pos(), 3);
    let r = t.routes();
    assert_eq!(r.gates.len(), 10 * 2 * 3);
    assert_eq!((r.schemes.len(), r.kv_heads.len()), (10 * 2, 10 * 2));
    // the same vectors as routes()
    let flat = ctx.routes(3, 10).unwrap();
    assert_eq!(r.gates, flat.gates);
    assert_eq!(r.schemes, flat.schemes);
    assert_eq!(r.kv_heads, flat.kv_heads);

    // each (token, layer) as moas_context_routes() gives that one position
    let schemes = m.schemes();
    for tok in 0..t.n_tokens() {
        let (mut g, mut s, mut h) = (vec![0f32; 2 * 3], vec![0i32; 2], vec![0i32; 2]);
        let st = unsafe {
            moas::ffi::moas_context_routes(
                ctx.as_ptr(),
                3 + tok as i32,
                1,
                g.as_mut_ptr(),
                s.as_mut_ptr(),
                h.as_mut_ptr(),
            )
        };
        assert_eq!(st, moas::ffi::MOAS_OK);
        for layer in 0..t.n_layer() {
            assert_eq!(
                t.gates_at(tok, layer).unwrap(),
                &g[layer * 3..layer * 3 + 3]
            );
            assert_eq!(t.scheme_at(tok, layer), Some(s[layer]));
            assert_eq!(t.kv_heads_at(tok, layer), Some(h[layer]));
            assert_eq!(h[layer], schemes[s[layer] as usize]);
        }
    }
    assert_eq!(t.gates_at(10, 0), None);
    assert_eq!(t.scheme_at(0, 2), None);
    assert_eq!(t.kv_heads_at(10, 2), None);
    let owned: moas::Routes = t.clone().into();
    assert_eq!(owned.schemes, t.into_routes().schemes);

    // an empty range has its shape too; a range outside the stored tokens is refused
    assert_eq!(ctx.route_table(20, 0).unwrap().shape(), (0, 2, 3));
    let e = ctx.route_table(15, 6).unwrap_err();
    assert_eq!(e.kind(), moas::ErrorKind::InvalidArg);
}

#[test]
fn named_companions_of_the_minus_one_and_zero_arguments() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let mut ctx = Context::new(&m, &routed).unwrap();
    ctx.decode_batch(&ids[..12]).unwrap();
    assert_eq!(
        ctx.scheme_counts_total().unwrap(),
        ctx.scheme_counts(-1).unwrap()
    );
    assert_eq!(ctx.kv_bytes_used_total(), ctx.kv_bytes_used(-1));
    assert_eq!(ctx.kv_bytes_reserved_total(), ctx.kv_bytes_reserved(-1));
    let used: usize = (0..m.n_layer())
        .map(|l| ctx.kv_bytes_used_in(l).unwrap())
        .sum();
    assert_eq!(used, ctx.kv_bytes_used_total());
    let reserved: usize = (0..m.n_layer())
        .map(|l| ctx.kv_bytes_reserved_in(l).unwrap())
        .sum();
    assert_eq!(reserved, ctx.kv_bytes_reserved_total());
    // a layer that does not exist is None, where the plain getters say 0
    for layer in [-1, m.n_layer(), i32::MAX] {
        assert_eq!(ctx.kv_bytes_used_in(layer), None);
        assert_eq!(ctx.kv_bytes_reserved_in(layer), None);
    }
    assert_eq!(ctx.kv_bytes_used(m.n_layer()), 0);
    // a token's bytes: mixture storage, or one scheme's
    assert_eq!(ctx.kv_token_bytes_mixture(), ctx.kv_token_bytes(-1));
    for s in 0..m.n_scheme() {
        assert_eq!(ctx.kv_token_bytes_routed(s), Some(ctx.kv_token_bytes(s)));
        assert!(ctx.kv_token_bytes(s) > 0);
    }
    assert_eq!(ctx.kv_token_bytes_routed(-1), None);
    assert_eq!(ctx.kv_token_bytes_routed(m.n_scheme()), None);

    // a budget of two tokens in mixture mode, then none
    let mut mix = Context::new(&m, &ContextParams::default()).unwrap();
    mix.set_kv_budget(2 * mix.kv_token_bytes_mixture()).unwrap();
    mix.decode_batch(&ids[..2]).unwrap();
    let e = mix.decode(ids[2]).unwrap_err();
    assert_eq!(e.kind(), moas::ErrorKind::ContextFull, "{e}");
    mix.clear_kv_budget().unwrap();
    mix.decode(ids[2]).unwrap();
    assert_eq!(mix.n_past(), 3);
}

#[test]
fn sample_context_equals_sampling_the_logits_copied_out() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let p = SamplerParams {
        temperature: 0.9,
        top_k: 20,
        seed: 7,
        repeat_penalty: 1.3,
        ..Default::default()
    };
    let mut from_ctx = Sampler::new(m.n_vocab(), &p).unwrap();
    let mut from_copy = Sampler::new(m.n_vocab(), &p).unwrap();
    let mut ctx = Context::new(&m, &ContextParams::default()).unwrap();

    // no logits yet: an error, not a panic
    let e = from_ctx.sample_context(&ctx).unwrap_err();
    assert_eq!(e.kind(), moas::ErrorKind::InvalidArg);
    assert!(e.message.contains("no logits"), "{e}");

    ctx.decode_batch(&ids[..8]).unwrap();
    let mut chosen = Vec::new();
    for _ in 0..30 {
        let copied: Vec<f32> = ctx.logits().unwrap().to_vec();
        let a = from_ctx.sample_context(&ctx).unwrap();
        let b = from_copy.sample(&copied).unwrap();
        assert_eq!(a, b);
        chosen.push(a);
        ctx.decode(a).unwrap();
    }
    assert!(chosen.iter().any(|&t| t != chosen[0]), "{chosen:?}");

    // a context whose last call asked for no logits, and a sampler of another size
    ctx.decode_batch_logits(&ids[8..10], Logits::None).unwrap();
    assert_eq!(
        from_ctx.sample_context(&ctx).unwrap_err().kind(),
        moas::ErrorKind::InvalidArg
    );
    ctx.decode(ids[10]).unwrap();
    let mut small = Sampler::new(10, &p).unwrap();
    assert_eq!(
        small.sample_context(&ctx).unwrap_err().kind(),
        moas::ErrorKind::InvalidArg
    );
}

#[test]
fn kv_bytes_held_and_state_size_are_the_c_figures() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    let page = pool.stats().page_bytes as usize;
    let mut a = pool.context(&ContextParams::default()).unwrap();
    assert_eq!((a.kv_pages(), a.kv_bytes_held()), (0, 0));
    a.decode_batch(&ids[..20]).unwrap();
    assert!(a.kv_pages() > 0);
    assert_eq!(a.kv_bytes_held(), a.kv_pages() as usize * page);
    // the pool's only context: it holds what the pool says is held
    assert_eq!(a.kv_bytes_held() as u64, pool.stats().bytes_held);
    // a fork shares the full pages: each holder counts them, the pool once
    let f = a.fork().unwrap();
    assert_eq!(f.kv_bytes_held(), f.kv_pages() as usize * page);
    assert!(((a.kv_bytes_held() + f.kv_bytes_held()) as u64) > pool.stats().bytes_held);
    // the bytes save_state() writes, asked before saving
    assert_eq!(a.state_size(), a.save_state().unwrap().len());
    assert_eq!(f.state_size(), f.save_state().unwrap().len());
}

#[test]
fn context_params_n_batch_sets_the_block_of_its_own_calls() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let pool = Pool::new(&m, 1 << 20, KvType::F32).unwrap();
    // the abort callback is asked before each block: blocks of 4 tokens ask more often
    let asks = |n_batch: i32| {
        let p = ContextParams {
            n_batch,
            ..Default::default()
        };
        let mut c = pool.context(&p).unwrap();
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = n.clone();
        c.set_abort_callback(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            false
        });
        c.decode_batch(&ids[..12]).unwrap();
        let mut alone = Context::new(&m, &ContextParams::default()).unwrap();
        alone.decode_batch(&ids[..12]).unwrap();
        assert_eq!(c.logits(), alone.logits()); // the same numbers whatever the blocks
        n.load(std::sync::atomic::Ordering::Relaxed)
    };
    let (whole, fours) = (asks(0), asks(4));
    assert!(
        fours > whole,
        "blocks of 4 asked {fours} times, of 128 {whole}"
    );
    assert_eq!(ContextParams::default().n_batch, 0);
    let bad = ContextParams {
        n_batch: 65537,
        ..Default::default()
    };
    assert_eq!(
        Context::new(&m, &bad).unwrap_err().kind(),
        ErrorKind::InvalidArg
    );
}

#[test]
fn reference_kernels_for_a_context_and_a_pool() {
    // Kernels::Ref runs the plain C kernels, for a context of its own and for every
    // context of a pool; their logits are the same model's within round-off
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let mut auto = Context::new(&m, &ContextParams::default()).unwrap();
    let reference = ContextParams {
        kernels: Kernels::Ref,
        ..Default::default()
    };
    let mut alone = Context::new(&m, &reference).unwrap();
    assert_eq!(alone.kernels_name(), "ref");
    let pool = Pool::with_params(
        &m,
        &PoolParams {
            capacity_bytes: 1 << 20,
            kernels: Kernels::Ref,
            ..Default::default()
        },
    )
    .unwrap();
    let mut pooled = pool.context(&ContextParams::default()).unwrap();
    assert_eq!(pooled.kernels_name(), "ref");
    auto.decode_batch(&ids[..20]).unwrap();
    alone.decode_batch(&ids[..20]).unwrap();
    pooled.decode_batch(&ids[..20]).unwrap();
    let a = auto.logits().unwrap();
    for r in [alone.logits().unwrap(), pooled.logits().unwrap()] {
        assert!(
            a.iter().zip(r).all(|(x, y)| (x - y).abs() <= 1e-4),
            "{a:?} {r:?}"
        );
    }
    assert_eq!(alone.logits(), pooled.logits()); // the same kernels, the same bits

    // as_ptr reaches the C pool: its stats through the raw call are the wrapper's
    let mut info: moas::ffi::moas_pool_info = unsafe { std::mem::zeroed() };
    info.size = std::mem::size_of::<moas::ffi::moas_pool_info>() as u32;
    let status = unsafe { moas::ffi::moas_pool_stats(pool.as_ptr() as *mut _, &mut info) };
    assert_eq!(status, moas::ffi::MOAS_OK);
    assert_eq!(info.pages_free, pool.stats().pages_free);
    assert_eq!(info.n_contexts, 1);
}
