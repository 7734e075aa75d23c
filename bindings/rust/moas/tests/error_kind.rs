//! ErrorKind: every status of include/moas.h's table (read at test time, so a row the
//! crate does not know fails) maps to the variant of its name, and real failing calls of
//! the safe API carry the kind the header documents for them.
use moas::{ffi, Context, ContextParams, Error, ErrorKind, Logits, Mode, Model, Pool};
use std::path::Path;
use std::sync::Mutex;

mod common;
use common::{model, TEXT};

/// The rows of the header's MOAS_STATUS_MAP: (name without MOAS_, value).
fn header_statuses() -> Vec<(String, i32)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../include/moas.h");
    let header =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = header
        .find("#define MOAS_STATUS_MAP(X)")
        .expect("the status table");
    let mut rows = Vec::new();
    for line in header[start..].lines().skip(1) {
        let row = line.trim();
        let inner = match row.strip_prefix("X(") {
            Some(inner) => inner,
            None => break, // the table ends with its last continued line
        };
        let mut fields = inner.splitn(3, ',');
        let name = fields.next().unwrap().trim().to_string();
        let value: i32 = fields.next().unwrap().trim().parse().expect(row);
        rows.push((name, value));
        if !row.ends_with('\\') {
            break;
        }
    }
    rows
}

/// "ERR_INVALID_UTF8" -> "InvalidUtf8": the variant's name as Debug prints it.
fn variant_name(status_name: &str) -> String {
    let words = status_name.strip_prefix("ERR_").expect(status_name);
    words
        .split('_')
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            let mut cs = lower.chars();
            let first = cs.next().unwrap().to_ascii_uppercase();
            std::iter::once(first).chain(cs).collect::<String>()
        })
        .collect()
}

fn error(status: i32) -> Error {
    Error {
        status,
        message: String::new(),
    }
}

#[test]
fn every_status_of_the_header_maps_to_its_kind() {
    let rows = header_statuses();
    assert_eq!(rows.len() as i32, ffi::MOAS_STATUS_COUNT, "{rows:?}");
    assert_eq!(rows[0], ("OK".to_string(), 0));
    let errors = &rows[1..];
    assert_eq!(errors.len(), 16);
    for (name, value) in errors {
        let kind = ErrorKind::from_status(*value);
        assert_eq!(format!("{kind:?}"), variant_name(name), "{name} = {value}");
        assert!(!matches!(kind, ErrorKind::Other(_)), "{name}");
        assert_eq!(kind.status(), *value);
        let e = error(*value);
        assert_eq!(e.kind(), kind);
        assert_eq!(e.name(), format!("MOAS_{name}"));
        assert_eq!(e.is_retryable(), name == "ERR_BUSY", "{name}");
    }
    // a kind per status: no two statuses share one
    let mut kinds: Vec<String> = errors
        .iter()
        .map(|(_, v)| format!("{:?}", ErrorKind::from_status(*v)))
        .collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds.len(), errors.len());

    // what the crate does not know: MOAS_OK (no failure) and statuses past the table
    let past = -ffi::MOAS_STATUS_COUNT;
    for status in [0, past, 1, i32::MIN] {
        assert_eq!(ErrorKind::from_status(status), ErrorKind::Other(status));
        assert_eq!(ErrorKind::Other(status).status(), status);
        assert!(!error(status).is_retryable());
    }
    assert_eq!(ErrorKind::Busy.status(), ffi::MOAS_ERR_BUSY);
    assert_eq!(ErrorKind::PoolFull.status(), ffi::MOAS_ERR_POOL_FULL);
}

#[test]
fn model_and_tokenizer_failures_carry_their_kind() {
    let e = Model::load("/nonexistent/model.gguf").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let bad = Model::from_bytes(b"not a gguf file at all, but long enough".to_vec());
    assert_eq!(bad.unwrap_err().kind(), ErrorKind::BadFormat);
    let m = model();
    let e = m.tokenize("Quiz").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnknownChar, "{e}");
    assert!(e.message.contains("U+0051"), "{e}");
    assert_eq!(
        m.meta_int("general.name").unwrap_err().kind(),
        ErrorKind::WrongType
    );
    assert_eq!(
        m.meta_int("no.such.key").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn decoding_failures_carry_their_kind() {
    let m = model();
    let mut ctx = Context::new(
        &m,
        &ContextParams {
            n_ctx: 2,
            ..Default::default()
        },
    )
    .unwrap();
    // a token id outside [0, n_vocab)
    let e = ctx.decode(m.n_vocab()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArg, "{e}");
    assert!(!e.is_retryable());
    assert_eq!(ctx.decode(-1).unwrap_err().kind(), ErrorKind::InvalidArg);
    // a batch that does not fit n_ctx: refused whole, by the library and by the crate's
    // own check before it sizes every token's logits
    let e = ctx.decode_batch(&[1, 2, 3]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ContextFull, "{e}");
    assert_eq!(ctx.n_past(), 0);
    let e = ctx
        .decode_batch_logits(&[1, 2, 3], Logits::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ContextFull, "{e}");
    ctx.decode_batch(&[1, 2]).unwrap();
    assert_eq!(ctx.decode(3).unwrap_err().kind(), ErrorKind::ContextFull);
    // a forced scheme in mixture mode
    assert_eq!(
        ctx.force_scheme(Some(0)).unwrap_err().kind(),
        ErrorKind::InvalidArg
    );
}

#[test]
fn a_pool_without_free_pages_is_pool_full() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    // 4 KiB of pages: a few tokens of mixture storage (every scheme's heads)
    let pool = Pool::new(&m, 4096, moas::KvType::F32).unwrap();
    let mut ctx = pool.context(&ContextParams::default()).unwrap();
    let e = ctx.decode_batch(&ids).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolFull, "{e}");
    assert_eq!(ctx.n_past(), 0); // all or nothing
    let mut stored = 0;
    let e = loop {
        match ctx.decode(ids[stored]) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < ids.len(), "4 KiB held {stored} tokens");
    };
    assert_eq!(e.kind(), ErrorKind::PoolFull, "{e}");
    assert!(!e.is_retryable());
    assert!(stored > 0, "4 KiB hold a few tokens");
    assert_eq!(ctx.n_past(), stored as i32);
    // the same through Pool::decode
    let mut other = pool.context(&ContextParams::default()).unwrap();
    let e = pool.decode(&mut [(&mut other, &ids[..])]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolFull, "{e}");
}

#[test]
fn a_route_callback_calling_its_own_context_is_busy() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let routed = ContextParams {
        mode: Mode::Routed,
        ..Default::default()
    };
    let statuses = Mutex::new(Vec::new());
    let mut ctx = Context::new(&m, &routed).unwrap();
    ctx.decode_batch(&ids[..5]).unwrap();
    // the closure cannot borrow the context it is called for; the C pointer reaches it,
    // and the library refuses the call (THREADING in moas.h)
    let raw = ctx.as_ptr() as usize;
    let seen = &statuses;
    ctx.set_route_callback(move |e| {
        if e.layer == 0 {
            let st = unsafe { ffi::moas_context_truncate(raw as *mut ffi::moas_context, 0) };
            let message = unsafe { std::ffi::CStr::from_ptr(ffi::moas_last_error()) };
            seen.lock()
                .unwrap()
                .push((st, message.to_string_lossy().into_owned()));
        }
        None
    });
    ctx.decode(ids[5]).unwrap();
    assert_eq!(ctx.n_past(), 6); // the truncate changed nothing, the decode went on
    let got = statuses.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (status, message) = got[0].clone();
    let e = Error { status, message };
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.is_retryable());
    // retried once the decode has returned, it succeeds
    ctx.clear_route_callback();
    ctx.truncate(0).unwrap();
    assert_eq!(ctx.n_past(), 0);
}

#[test]
fn a_pool_decode_from_a_route_callback_of_that_pool_is_busy() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let kinds = Mutex::new(Vec::new());
    let pool = Pool::new(&m, 1 << 20, moas::KvType::F32).unwrap();
    let mut a = pool.context(&ContextParams::default()).unwrap();
    let mut b = pool.context(&ContextParams::default()).unwrap();
    let (pool_ref, seen) = (&pool, &kinds);
    let first = ids[0];
    a.set_route_callback(move |e| {
        if e.pos == 0 && e.layer == 0 {
            // the safe API alone: another moas_pool_decode() on a pool under way
            let r = pool_ref.decode(&mut [(&mut b, &[first][..])]);
            seen.lock()
                .unwrap()
                .push(r.map_err(|e| (e.kind(), b.n_past())));
        }
        None
    });
    pool.decode(&mut [(&mut a, &ids[..3])]).unwrap();
    assert_eq!(a.n_past(), 3);
    let got = kinds.lock().unwrap().clone();
    assert_eq!(got, vec![Err((ErrorKind::Busy, 0))]);
}

#[test]
fn pool_full_says_how_many_pages_were_lacking() {
    let m = model();
    let ids = m.tokenize(TEXT).unwrap();
    let with_pages = |n_pages: u64| {
        let page = Pool::new(&m, 1 << 20, moas::KvType::F32)
            .unwrap()
            .stats()
            .page_bytes;
        Pool::new(&m, n_pages * page, moas::KvType::F32).unwrap()
    };
    let decode = |pool: &Pool<'_>| {
        let mut ctx = pool.context(&ContextParams::default()).unwrap();
        ctx.decode_batch(&ids).map(|()| ctx.kv_pages())
    };
    let e = decode(&with_pages(2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolFull, "{e}");
    let lacking = e.pages_lacking().expect("a count of pages");
    assert!(lacking > 0, "{e}");
    // that many pages more and the same decode fits; one fewer and one page lacks
    assert!(decode(&with_pages(2 + lacking)).is_ok());
    let e = decode(&with_pages(1 + lacking)).unwrap_err();
    assert_eq!(e.pages_lacking(), Some(1), "{e}");
    // the same through a fork that cannot copy its parent's last pages
    let pool = with_pages(2 + lacking);
    let mut full = pool.context(&ContextParams::default()).unwrap();
    full.decode_batch(&ids).unwrap();
    let e = full.fork().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolFull, "{e}");
    assert!(e.pages_lacking().unwrap_or(0) > 0, "{e}");
    // another kind has no count
    assert_eq!(error(ffi::MOAS_ERR_BUSY).pages_lacking(), None);
}
