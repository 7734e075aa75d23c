//! Raw declarations of libmoas's C API (`include/moas.h`), one for one: the types,
//! constants, `#[repr(C)]` structs and the `extern "C"` block. No wrappers, no
//! dependencies; the safe API is the `moas` crate (bindings/rust/moas).
//!
//! build.rs links the library it finds (`MOAS_LIB_DIR`, else pkg-config, else this
//! source tree's `lib/`), shared by default or static with the `static` feature, and
//! tells dependents' build scripts where it is: `DEP_MOAS_LIBDIR`, `DEP_MOAS_ROOT`,
//! `DEP_MOAS_STATIC` (bindings/rust/README.md).
#![allow(non_camel_case_types)]

/// How build.rs found the library and how it linked it, e.g.
/// `"pkg-config, dylib: /usr/local/lib"`.
pub const LINKED_FROM: &str = env!("MOAS_LINKED_FROM");

use std::os::raw::{c_char, c_int, c_void};

/// The version of the header these declarations follow; moas_version_number() gives the
/// linked library's.
pub const MOAS_VERSION_MAJOR: i32 = 1;
pub const MOAS_VERSION_MINOR: i32 = 1;
pub const MOAS_VERSION_PATCH: i32 = 0;
pub const MOAS_VERSION_NUMBER: i32 =
    MOAS_VERSION_MAJOR * 10000 + MOAS_VERSION_MINOR * 100 + MOAS_VERSION_PATCH;
pub const MOAS_VERSION_STRING: &str = "1.1.0";

pub type moas_status = c_int;
pub type moas_log_level = c_int;
pub type moas_type = c_int;
pub type moas_mixing = c_int;
pub type moas_kv_sharing = c_int;
pub type moas_meta_type = c_int;
pub type moas_mode = c_int;
pub type moas_kernels = c_int;
pub type moas_logits = c_int;
pub type moas_unknown = c_int;

pub const MOAS_OK: moas_status = 0;
pub const MOAS_ERR_INVALID_ARG: moas_status = -1;
pub const MOAS_ERR_NO_MEMORY: moas_status = -2;
pub const MOAS_ERR_IO: moas_status = -3;
pub const MOAS_ERR_BAD_FORMAT: moas_status = -4;
pub const MOAS_ERR_CORRUPT: moas_status = -5;
pub const MOAS_ERR_UNSUPPORTED: moas_status = -6;
pub const MOAS_ERR_CONTEXT_FULL: moas_status = -7;
pub const MOAS_ERR_UNKNOWN_CHAR: moas_status = -8;
pub const MOAS_ERR_BUFFER_TOO_SMALL: moas_status = -9;
pub const MOAS_ERR_NOT_FOUND: moas_status = -10;
pub const MOAS_ERR_WRONG_TYPE: moas_status = -11;
pub const MOAS_ERR_INTERNAL: moas_status = -12;
pub const MOAS_ERR_INVALID_UTF8: moas_status = -13;
pub const MOAS_ERR_POOL_FULL: moas_status = -14;
pub const MOAS_ERR_BUSY: moas_status = -15;
pub const MOAS_ERR_ABORTED: moas_status = -16;
pub const MOAS_STATUS_COUNT: i32 = 17; // number of statuses, not a status
pub const MOAS_TYPE_F32: moas_type = 0;
pub const MOAS_TYPE_F16: moas_type = 1;
pub const MOAS_TYPE_Q8_0: moas_type = 8;
pub const MOAS_TYPE_BF16: moas_type = 30;

// Each enum's _COUNT is the number of its values, not a value; it grows as values are
// appended, so it says what this header knows, not what the linked library accepts.
pub const MOAS_LOG_ERROR: moas_log_level = 0;
pub const MOAS_LOG_WARN: moas_log_level = 1;
pub const MOAS_LOG_INFO: moas_log_level = 2;
pub const MOAS_LOG_DEBUG: moas_log_level = 3;
pub const MOAS_LOG_LEVEL_COUNT: moas_log_level = 4;

pub const MOAS_MIXING_SINGLE: moas_mixing = 0;
pub const MOAS_MIXING_MEAN: moas_mixing = 1;
pub const MOAS_MIXING_ROUTER: moas_mixing = 2;
pub const MOAS_MIXING_COUNT: moas_mixing = 3;

pub const MOAS_KV_SHARING_INDEPENDENT: moas_kv_sharing = 0;
pub const MOAS_KV_SHARING_POOLED: moas_kv_sharing = 1;
pub const MOAS_KV_SHARING_COUNT: moas_kv_sharing = 2;

pub const MOAS_META_UINT8: moas_meta_type = 0;
pub const MOAS_META_INT8: moas_meta_type = 1;
pub const MOAS_META_UINT16: moas_meta_type = 2;
pub const MOAS_META_INT16: moas_meta_type = 3;
pub const MOAS_META_UINT32: moas_meta_type = 4;
pub const MOAS_META_INT32: moas_meta_type = 5;
pub const MOAS_META_FLOAT32: moas_meta_type = 6;
pub const MOAS_META_BOOL: moas_meta_type = 7;
pub const MOAS_META_STRING: moas_meta_type = 8;
pub const MOAS_META_ARRAY: moas_meta_type = 9;
pub const MOAS_META_UINT64: moas_meta_type = 10;
pub const MOAS_META_INT64: moas_meta_type = 11;
pub const MOAS_META_FLOAT64: moas_meta_type = 12;
pub const MOAS_META_TYPE_COUNT: moas_meta_type = 13;

pub const MOAS_MODE_MIXTURE: moas_mode = 0;
pub const MOAS_MODE_ROUTED: moas_mode = 1;
pub const MOAS_MODE_COUNT: moas_mode = 2;

pub const MOAS_KERNELS_AUTO: moas_kernels = 0;
pub const MOAS_KERNELS_REF: moas_kernels = 1;
pub const MOAS_KERNELS_COUNT: moas_kernels = 2;

pub const MOAS_LOGITS_NONE: moas_logits = 0;
pub const MOAS_LOGITS_LAST: moas_logits = 1;
pub const MOAS_LOGITS_ALL: moas_logits = 2;
pub const MOAS_LOGITS_COUNT: moas_logits = 3;

pub const MOAS_UNKNOWN_ERROR: moas_unknown = 0;
pub const MOAS_UNKNOWN_REPLACE: moas_unknown = 1;
pub const MOAS_UNKNOWN_DROP: moas_unknown = 2;
pub const MOAS_UNKNOWN_COUNT: moas_unknown = 3;

#[repr(C)]
pub struct moas_model {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct moas_context {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct moas_sampler {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct moas_pool {
    _opaque: [u8; 0],
}

pub type moas_log_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, level: moas_log_level, message: *const c_char)>;
pub type moas_route_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        pos: i32,
        layer: i32,
        gates: *const f32,
        n_scheme: i32,
        proposed: i32,
    ) -> i32,
>;
pub type moas_abort_fn = Option<unsafe extern "C" fn(user: *mut c_void) -> i32>;

#[repr(C)]
pub struct moas_allocator {
    pub alloc: Option<unsafe extern "C" fn(user: *mut c_void, size: usize) -> *mut c_void>,
    pub free: Option<unsafe extern "C" fn(user: *mut c_void, ptr: *mut c_void)>,
    pub user: *mut c_void,
}

#[repr(C)]
pub struct moas_model_params {
    pub size: u32,
    pub use_mmap: i32,
    pub log: moas_log_fn,
    pub log_user: *mut c_void,
    pub allocator: *const moas_allocator,
}

#[repr(C)]
pub struct moas_context_params {
    pub size: u32,
    pub n_ctx: i32,
    pub n_threads: i32,
    pub mode: i32,    // a moas_mode
    pub kv_type: i32, // a moas_type
    pub kernels: i32, // a moas_kernels
    pub log: moas_log_fn,
    pub log_user: *mut c_void,
    pub allocator: *const moas_allocator,
    pub forced_scheme: i32,
    pub kv_budget_bytes: u64,
    pub route_fn: moas_route_fn,
    pub route_user: *mut c_void,
    pub pool: *mut moas_pool,
    pub n_batch: i32,
}

#[repr(C)]
pub struct moas_pool_params {
    pub size: u32,
    pub capacity_bytes: u64,
    pub kv_type: i32,
    pub page_heads: i32,
    pub n_threads: i32,
    pub kernels: i32,
    pub n_batch: i32,
    pub log: moas_log_fn,
    pub log_user: *mut c_void,
    pub allocator: *const moas_allocator,
    pub steer_below: f32,
    pub commit: i32,
}

#[repr(C)]
pub struct moas_pool_info {
    pub size: u32,
    pub page_heads: i32,
    pub page_bytes: u64,
    pub n_pages: i32,
    pub pages_free: i32,
    pub n_contexts: i32,
    pub bytes_capacity: u64,
    pub bytes_held: u64,
    pub bytes_used: u64,
    pub bytes_stored: u64,
    pub n_threads: i32,
}

#[repr(C)]
pub struct moas_pool_seq {
    pub ctx: *mut moas_context,
    pub tokens: *const i32,
    pub n_tokens: i32,
    pub which: i32, // a moas_logits
    pub logits: *mut f32,
}

#[repr(C)]
pub struct moas_sampler_params {
    pub size: u32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u64,
    pub allocator: *const moas_allocator,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub n_logit_bias: i32,
    pub logit_bias: *const moas_logit_bias,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

#[repr(C)]
pub struct moas_logit_bias {
    pub token: i32,
    pub bias: f32,
}

#[repr(C)]
pub struct moas_tokenize_params {
    pub size: u32,
    pub unknown: i32,
    pub replacement: i32,
}

#[repr(C)]
pub struct moas_tensor_info {
    pub size: u32,
    pub name: *const c_char,
    pub type_: moas_type,
    pub n_dims: i32,
    pub ne: [i64; 4],
    pub offset: u64,
    pub n_bytes: u64,
    pub data: *const c_void,
}

extern "C" {
    pub fn moas_version_number() -> i32;
    pub fn moas_version_string() -> *const c_char;
    pub fn moas_status_string(status: moas_status) -> *const c_char;
    pub fn moas_status_name(status: moas_status) -> *const c_char;
    pub fn moas_last_error() -> *const c_char;

    pub fn moas_model_params_init_sized(params: *mut moas_model_params, size: usize);
    pub fn moas_model_load(
        path: *const c_char,
        params: *const moas_model_params,
        out: *mut *mut moas_model,
    ) -> moas_status;
    pub fn moas_model_load_memory(
        data: *const c_void,
        size: usize,
        params: *const moas_model_params,
        out: *mut *mut moas_model,
    ) -> moas_status;
    pub fn moas_model_free(model: *mut moas_model);
    pub fn moas_model_arch(model: *const moas_model) -> *const c_char;
    pub fn moas_model_name(model: *const moas_model) -> *const c_char;
    pub fn moas_model_n_layer(model: *const moas_model) -> i32;
    pub fn moas_model_n_embd(model: *const moas_model) -> i32;
    pub fn moas_model_n_head(model: *const moas_model) -> i32;
    pub fn moas_model_head_dim(model: *const moas_model) -> i32;
    pub fn moas_model_n_ff(model: *const moas_model) -> i32;
    pub fn moas_model_n_vocab(model: *const moas_model) -> i32;
    pub fn moas_model_n_ctx_train(model: *const moas_model) -> i32;
    pub fn moas_model_n_scheme(model: *const moas_model) -> i32;
    pub fn moas_model_mixing(model: *const moas_model) -> moas_mixing;
    pub fn moas_model_kv_sharing(model: *const moas_model) -> moas_kv_sharing;
    pub fn moas_model_has_bias(model: *const moas_model) -> i32;
    pub fn moas_model_n_params(model: *const moas_model) -> u64;
    pub fn moas_model_scheme_n_kv(model: *const moas_model, scheme: i32) -> i32;
    pub fn moas_model_n_tensors(model: *const moas_model) -> i64;
    pub fn moas_model_tensor(
        model: *const moas_model,
        index: i64,
        info: *mut moas_tensor_info,
    ) -> moas_status;
    pub fn moas_model_tensor_find(
        model: *const moas_model,
        name: *const c_char,
        index: *mut i64,
    ) -> moas_status;
    pub fn moas_model_meta_count(model: *const moas_model) -> i64;
    pub fn moas_model_meta_key(model: *const moas_model, index: i64) -> *const c_char;
    pub fn moas_model_meta_type(
        model: *const moas_model,
        key: *const c_char,
        type_: *mut moas_meta_type,
    ) -> moas_status;
    pub fn moas_model_meta_int(
        model: *const moas_model,
        key: *const c_char,
        value: *mut i64,
    ) -> moas_status;
    pub fn moas_model_meta_float(
        model: *const moas_model,
        key: *const c_char,
        value: *mut f64,
    ) -> moas_status;
    pub fn moas_model_meta_bool(
        model: *const moas_model,
        key: *const c_char,
        value: *mut i32,
    ) -> moas_status;
    pub fn moas_model_meta_string(
        model: *const moas_model,
        key: *const c_char,
        value: *mut *const c_char,
        length: *mut usize,
    ) -> moas_status;
    pub fn moas_model_meta_array(
        model: *const moas_model,
        key: *const c_char,
        elem_type: *mut moas_meta_type,
        n_elems: *mut u64,
    ) -> moas_status;
    pub fn moas_model_meta_array_int(
        model: *const moas_model,
        key: *const c_char,
        index: u64,
        value: *mut i64,
    ) -> moas_status;
    pub fn moas_model_meta_array_float(
        model: *const moas_model,
        key: *const c_char,
        index: u64,
        value: *mut f64,
    ) -> moas_status;
    pub fn moas_model_meta_array_string(
        model: *const moas_model,
        key: *const c_char,
        index: u64,
        value: *mut *const c_char,
        length: *mut usize,
    ) -> moas_status;

    pub fn moas_context_params_init_sized(params: *mut moas_context_params, size: usize);
    pub fn moas_context_create(
        model: *const moas_model,
        params: *const moas_context_params,
        out: *mut *mut moas_context,
    ) -> moas_status;
    pub fn moas_context_free(ctx: *mut moas_context);
    pub fn moas_context_decode(ctx: *mut moas_context, token: i32, logits: *mut f32)
        -> moas_status;
    pub fn moas_context_decode_batch(
        ctx: *mut moas_context,
        tokens: *const i32,
        n_tokens: i32,
        logits: *mut f32,
        which: moas_logits,
    ) -> moas_status;
    pub fn moas_context_logits(ctx: *const moas_context) -> *const f32;
    pub fn moas_context_n_past(ctx: *const moas_context) -> i32;
    pub fn moas_context_n_ctx(ctx: *const moas_context) -> i32;
    pub fn moas_context_mode(ctx: *const moas_context) -> moas_mode;
    pub fn moas_context_model(ctx: *const moas_context) -> *const moas_model;
    pub fn moas_context_kernels_name(ctx: *const moas_context) -> *const c_char;
    pub fn moas_context_reset(ctx: *mut moas_context);
    pub fn moas_context_truncate(ctx: *mut moas_context, n_keep: i32) -> moas_status;
    pub fn moas_context_routes(
        ctx: *const moas_context,
        pos: i32,
        n_pos: i32,
        gates: *mut f32,
        schemes: *mut i32,
        kv_heads: *mut i32,
    ) -> moas_status;
    pub fn moas_context_scheme_counts(
        ctx: *const moas_context,
        layer: i32,
        counts: *mut i32,
    ) -> moas_status;
    pub fn moas_context_force_scheme(ctx: *mut moas_context, scheme: i32) -> moas_status;
    pub fn moas_context_set_kv_budget(ctx: *mut moas_context, bytes: u64) -> moas_status;
    pub fn moas_context_set_route_callback(
        ctx: *mut moas_context,
        fn_: moas_route_fn,
        user: *mut c_void,
    );
    pub fn moas_context_set_abort_callback(
        ctx: *mut moas_context,
        fn_: moas_abort_fn,
        user: *mut c_void,
    );
    pub fn moas_context_kv_bytes_used(ctx: *const moas_context, layer: i32) -> usize;
    pub fn moas_context_kv_bytes_reserved(ctx: *const moas_context, layer: i32) -> usize;
    pub fn moas_context_kv_token_bytes(ctx: *const moas_context, scheme: i32) -> u64;
    pub fn moas_context_n_threads(ctx: *const moas_context) -> i32;

    pub fn moas_pool_params_init_sized(params: *mut moas_pool_params, size: usize);
    pub fn moas_pool_create(
        model: *const moas_model,
        params: *const moas_pool_params,
        out: *mut *mut moas_pool,
    ) -> moas_status;
    pub fn moas_pool_free(pool: *mut moas_pool);
    pub fn moas_pool_stats(pool: *mut moas_pool, info: *mut moas_pool_info) -> moas_status;
    pub fn moas_pool_decode(
        pool: *mut moas_pool,
        seqs: *const moas_pool_seq,
        n_seqs: i32,
    ) -> moas_status;
    pub fn moas_context_fork(parent: *mut moas_context, out: *mut *mut moas_context)
        -> moas_status;
    pub fn moas_context_compact(
        ctx: *mut moas_context,
        n_before: i32,
        scheme: i32,
        n_changed: *mut i32,
    ) -> moas_status;
    pub fn moas_context_shift(ctx: *mut moas_context, n_keep: i32, n_discard: i32) -> moas_status;
    pub fn moas_context_kv_pages(ctx: *const moas_context) -> i32;
    pub fn moas_context_kv_bytes_held(ctx: *const moas_context) -> usize;
    pub fn moas_context_state_size(ctx: *const moas_context) -> usize;
    pub fn moas_context_state_save(
        ctx: *const moas_context,
        buf: *mut c_void,
        size: usize,
        written: *mut usize,
    ) -> moas_status;
    pub fn moas_context_state_load(
        ctx: *mut moas_context,
        buf: *const c_void,
        size: usize,
    ) -> moas_status;

    pub fn moas_tokenize(
        model: *const moas_model,
        text: *const c_char,
        text_len: usize,
        tokens: *mut i32,
        n_max: usize,
        n_tokens: *mut usize,
    ) -> moas_status;
    pub fn moas_tokenize_params_init_sized(params: *mut moas_tokenize_params, size: usize);
    pub fn moas_tokenize_ex(
        model: *const moas_model,
        text: *const c_char,
        text_len: usize,
        params: *const moas_tokenize_params,
        tokens: *mut i32,
        n_max: usize,
        n_tokens: *mut usize,
        n_changed: *mut usize,
    ) -> moas_status;
    pub fn moas_detokenize(
        model: *const moas_model,
        tokens: *const i32,
        n_tokens: usize,
        text: *mut c_char,
        capacity: usize,
        length: *mut usize,
    ) -> moas_status;
    pub fn moas_token_text(model: *const moas_model, token: i32) -> *const c_char;

    pub fn moas_sampler_params_init_sized(params: *mut moas_sampler_params, size: usize);
    pub fn moas_sampler_create(
        params: *const moas_sampler_params,
        n_vocab: i32,
        out: *mut *mut moas_sampler,
    ) -> moas_status;
    pub fn moas_sampler_free(sampler: *mut moas_sampler);
    pub fn moas_sampler_sample(
        sampler: *mut moas_sampler,
        logits: *const f32,
        token: *mut i32,
    ) -> moas_status;
    pub fn moas_sampler_reseed(sampler: *mut moas_sampler, seed: u64);
    pub fn moas_sampler_accept(sampler: *mut moas_sampler, token: i32) -> moas_status;
    pub fn moas_sampler_reset(sampler: *mut moas_sampler);
    pub fn moas_text_find_stop(
        text: *const c_char,
        len: usize,
        stops: *const *const c_char,
        n_stops: usize,
        more: i32,
        end: *mut usize,
        found: *mut i32,
    ) -> moas_status;
}
