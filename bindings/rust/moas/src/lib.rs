//! Safe Rust bindings to libmoas, written by hand against `include/moas.h`; the raw
//! declarations are the `moas-sys` crate (no other dependencies).
//!
//! [`ffi`] declares the whole C API. [`Model`], [`Context`] and [`Sampler`] own one C
//! object each and free it in `Drop`. Every failing call returns [`Error`]: the status,
//! its name and `moas_last_error()`; [`Error::kind`] names the status as an [`ErrorKind`]
//! to match on (`ErrorKind::ContextFull`, `ErrorKind::Busy`, ...).
//!
//! The C API's lifetime rules become borrows: a `Context<'m>` borrows its `Model`, so the
//! model outlives it; `Context::logits()` borrows the context, and every call that
//! changes the logits (`decode`, `decode_batch`, `truncate`, `reset`) takes `&mut self`,
//! so a stale logits slice cannot exist.

use std::any::Any;
use std::ffi::{CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::os::raw::{c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::ptr::{self, NonNull};

/// The raw C declarations: the `moas-sys` crate.
pub use moas_sys as ffi;

// ---- errors ---------------------------------------------------------------------------

/// The names of moas.h's status table, by -value.
const STATUS_NAMES: [&str; 17] = [
    "MOAS_OK",
    "MOAS_ERR_INVALID_ARG",
    "MOAS_ERR_NO_MEMORY",
    "MOAS_ERR_IO",
    "MOAS_ERR_BAD_FORMAT",
    "MOAS_ERR_CORRUPT",
    "MOAS_ERR_UNSUPPORTED",
    "MOAS_ERR_CONTEXT_FULL",
    "MOAS_ERR_UNKNOWN_CHAR",
    "MOAS_ERR_BUFFER_TOO_SMALL",
    "MOAS_ERR_NOT_FOUND",
    "MOAS_ERR_WRONG_TYPE",
    "MOAS_ERR_INTERNAL",
    "MOAS_ERR_INVALID_UTF8",
    "MOAS_ERR_POOL_FULL",
    "MOAS_ERR_BUSY",
    "MOAS_ERR_ABORTED",
];

/// What kind of failure an [`Error`] is: one variant per error status of moas.h's table
/// (`MOAS_ERR_INVALID_ARG` is `InvalidArg`, ...), so that callers match on it instead of
/// comparing [`Error::status`] with `ffi::MOAS_ERR_*`.
///
/// `#[non_exhaustive]`: a later version of the crate adds a variant for each status the
/// library appends. A status this crate does not know (one a newer library added, or
/// `MOAS_OK`, which is no failure) is `Other(status)`; [`ErrorKind::status`] gives it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `MOAS_ERR_INVALID_ARG` (-1): a bad argument, e.g. a token id outside [0, n_vocab).
    InvalidArg,
    /// `MOAS_ERR_NO_MEMORY` (-2).
    NoMemory,
    /// `MOAS_ERR_IO` (-3): the model file cannot be opened, mapped or read.
    Io,
    /// `MOAS_ERR_BAD_FORMAT` (-4): not a GGUF version 3 file (or not a saved state).
    BadFormat,
    /// `MOAS_ERR_CORRUPT` (-5): a truncated or inconsistent model file or state.
    Corrupt,
    /// `MOAS_ERR_UNSUPPORTED` (-6): the model needs a feature this build lacks.
    Unsupported,
    /// `MOAS_ERR_CONTEXT_FULL` (-7): n_ctx tokens stored, or the KV budget has no room.
    ContextFull,
    /// `MOAS_ERR_UNKNOWN_CHAR` (-8): text has a character outside the vocabulary.
    UnknownChar,
    /// `MOAS_ERR_BUFFER_TOO_SMALL` (-9).
    BufferTooSmall,
    /// `MOAS_ERR_NOT_FOUND` (-10): no such metadata key or tensor.
    NotFound,
    /// `MOAS_ERR_WRONG_TYPE` (-11): the metadata value has another type.
    WrongType,
    /// `MOAS_ERR_INTERNAL` (-12): a bug in libmoas.
    Internal,
    /// `MOAS_ERR_INVALID_UTF8` (-13).
    InvalidUtf8,
    /// `MOAS_ERR_POOL_FULL` (-14): the KV pool has too few free pages.
    PoolFull,
    /// `MOAS_ERR_BUSY` (-15): another call holds the object; nothing changed, and the
    /// call may be retried once that one has returned.
    Busy,
    /// `MOAS_ERR_ABORTED` (-16): the context's abort callback stopped the call; every
    /// context of it is as before the call, its logits aside.
    Aborted,
    /// A status this crate does not know.
    Other(i32),
}

impl ErrorKind {
    /// The kind of a moas_status value (`Other(status)` for one not in this crate's
    /// table, `MOAS_OK` included).
    pub fn from_status(status: i32) -> ErrorKind {
        match status {
            ffi::MOAS_ERR_INVALID_ARG => ErrorKind::InvalidArg,
            ffi::MOAS_ERR_NO_MEMORY => ErrorKind::NoMemory,
            ffi::MOAS_ERR_IO => ErrorKind::Io,
            ffi::MOAS_ERR_BAD_FORMAT => ErrorKind::BadFormat,
            ffi::MOAS_ERR_CORRUPT => ErrorKind::Corrupt,
            ffi::MOAS_ERR_UNSUPPORTED => ErrorKind::Unsupported,
            ffi::MOAS_ERR_CONTEXT_FULL => ErrorKind::ContextFull,
            ffi::MOAS_ERR_UNKNOWN_CHAR => ErrorKind::UnknownChar,
            ffi::MOAS_ERR_BUFFER_TOO_SMALL => ErrorKind::BufferTooSmall,
            ffi::MOAS_ERR_NOT_FOUND => ErrorKind::NotFound,
            ffi::MOAS_ERR_WRONG_TYPE => ErrorKind::WrongType,
            ffi::MOAS_ERR_INTERNAL => ErrorKind::Internal,
            ffi::MOAS_ERR_INVALID_UTF8 => ErrorKind::InvalidUtf8,
            ffi::MOAS_ERR_POOL_FULL => ErrorKind::PoolFull,
            ffi::MOAS_ERR_BUSY => ErrorKind::Busy,
            ffi::MOAS_ERR_ABORTED => ErrorKind::Aborted,
            other => ErrorKind::Other(other),
        }
    }

    /// The moas_status value of this kind: `from_status(k.status()) == k`.
    pub fn status(self) -> i32 {
        match self {
            ErrorKind::InvalidArg => ffi::MOAS_ERR_INVALID_ARG,
            ErrorKind::NoMemory => ffi::MOAS_ERR_NO_MEMORY,
            ErrorKind::Io => ffi::MOAS_ERR_IO,
            ErrorKind::BadFormat => ffi::MOAS_ERR_BAD_FORMAT,
            ErrorKind::Corrupt => ffi::MOAS_ERR_CORRUPT,
            ErrorKind::Unsupported => ffi::MOAS_ERR_UNSUPPORTED,
            ErrorKind::ContextFull => ffi::MOAS_ERR_CONTEXT_FULL,
            ErrorKind::UnknownChar => ffi::MOAS_ERR_UNKNOWN_CHAR,
            ErrorKind::BufferTooSmall => ffi::MOAS_ERR_BUFFER_TOO_SMALL,
            ErrorKind::NotFound => ffi::MOAS_ERR_NOT_FOUND,
            ErrorKind::WrongType => ffi::MOAS_ERR_WRONG_TYPE,
            ErrorKind::Internal => ffi::MOAS_ERR_INTERNAL,
            ErrorKind::InvalidUtf8 => ffi::MOAS_ERR_INVALID_UTF8,
            ErrorKind::PoolFull => ffi::MOAS_ERR_POOL_FULL,
            ErrorKind::Busy => ffi::MOAS_ERR_BUSY,
            ErrorKind::Aborted => ffi::MOAS_ERR_ABORTED,
            ErrorKind::Other(status) => status,
        }
    }
}

/// A failed call: its status and the library's message for this failure.
/// [`Error::kind`] names the status for a `match`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: i32,
    pub message: String,
}

impl Error {
    /// The kind of failure, from [`Error::status`]:
    /// `if err.kind() == ErrorKind::ContextFull { ... }`.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::from_status(self.status)
    }

    /// True only for [`ErrorKind::Busy`]: another call held the object, nothing changed,
    /// and the same call may succeed once that one has returned. Every other failure
    /// would fail again as it is.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Busy
    }

    /// For [`ErrorKind::PoolFull`]: how many pages the pool lacked, which the library
    /// gives in its message alone ("... the KV pool lacks 12 page(s): 16 needed, 4 free
    /// of 64"); None for another kind, or a message without the count.
    pub fn pages_lacking(&self) -> Option<u64> {
        if self.kind() != ErrorKind::PoolFull {
            return None;
        }
        let (_, after) = self.message.split_once("lacks ")?;
        after.split(' ').next()?.parse().ok()
    }

    /// "MOAS_ERR_IO" for -3: this crate's table, or the library's name for a status a
    /// newer library added ("MOAS_UNKNOWN" for none).
    pub fn name(&self) -> &'static str {
        usize::try_from(-i64::from(self.status))
            .ok()
            .and_then(|i| STATUS_NAMES.get(i).copied())
            .or_else(|| unsafe { text(ffi::moas_status_name(self.status)) })
            .unwrap_or("MOAS_UNKNOWN")
    }

    /// moas_status_string(): the fixed sentence for the status.
    pub fn status_string(&self) -> String {
        unsafe { text(ffi::moas_status_string(self.status)) }
            .unwrap_or("")
            .to_string()
    }

    fn invalid(message: String) -> Error {
        Error {
            status: ffi::MOAS_ERR_INVALID_ARG,
            message,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // BAD_FORMAT's and CORRUPT's fixed sentences speak of model files, where a saved
        // state may be what was refused; their messages say which and why
        if (self.status == ffi::MOAS_ERR_BAD_FORMAT || self.status == ffi::MOAS_ERR_CORRUPT)
            && !self.message.is_empty()
        {
            return write!(f, "{}: {}", self.name(), self.message);
        }
        write!(
            f,
            "{} ({}): {}",
            self.name(),
            self.status_string(),
            self.message
        )
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Ok, or an Error carrying this thread's moas_last_error().
fn check(status: ffi::moas_status) -> Result<()> {
    if status == ffi::MOAS_OK {
        return Ok(());
    }
    let message = unsafe { CStr::from_ptr(ffi::moas_last_error()) };
    Err(Error {
        status,
        message: message.to_string_lossy().into_owned(),
    })
}

/// A borrowed C string as &str; None for NULL or invalid UTF-8.
unsafe fn text<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        None
    } else {
        CStr::from_ptr(p).to_str().ok()
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{s:?} contains a NUL byte")))
}

/// The library's defaults for a params struct whose first field is `u32 size`, filled by
/// its _init for exactly our declaration's size.
fn params<T>(init: unsafe extern "C" fn(*mut T, usize)) -> T {
    // _params_init_sized fills exactly our size_of::<T>() bytes (defaults, and `size`
    // set to what it filled), however large the library's own struct is.
    let mut p = std::mem::MaybeUninit::<T>::zeroed();
    unsafe {
        init(p.as_mut_ptr(), std::mem::size_of::<T>());
        p.assume_init()
    }
}

/// The version of the library actually linked, e.g. "1.0.0".
pub fn version() -> &'static str {
    unsafe { text(ffi::moas_version_string()) }.unwrap_or("")
}

// ---- model ----------------------------------------------------------------------------

/// A loaded model. Read-only, so it may be shared by threads.
pub struct Model {
    ptr: NonNull<ffi::moas_model>,
    _bytes: Option<Box<[u8]>>, // moas_model_load_memory borrows these until the model is freed
}

unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Map and check a GGUF file (moas_model_load).
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        // a path is bytes: any that hold no NUL, UTF-8 or not
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::invalid(format!("{path:?} contains a NUL byte")))?;
        let mut out = ptr::null_mut();
        check(unsafe { ffi::moas_model_load(c.as_ptr(), ptr::null(), &mut out) })?;
        Ok(Model {
            ptr: NonNull::new(out).expect("moas_model_load returned OK and NULL"),
            _bytes: None,
        })
    }

    /// Load a model held in memory (moas_model_load_memory); the model owns the bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Model> {
        let bytes = bytes.into_boxed_slice();
        let mut out = ptr::null_mut();
        check(unsafe {
            ffi::moas_model_load_memory(bytes.as_ptr().cast(), bytes.len(), ptr::null(), &mut out)
        })?;
        Ok(Model {
            ptr: NonNull::new(out).expect("OK and NULL"),
            _bytes: Some(bytes),
        })
    }

    pub fn as_ptr(&self) -> *const ffi::moas_model {
        self.ptr.as_ptr()
    }

    pub fn name(&self) -> &str {
        unsafe { text(ffi::moas_model_name(self.as_ptr())) }.unwrap_or("")
    }
    pub fn n_layer(&self) -> i32 {
        unsafe { ffi::moas_model_n_layer(self.as_ptr()) }
    }
    pub fn n_head(&self) -> i32 {
        unsafe { ffi::moas_model_n_head(self.as_ptr()) }
    }
    pub fn head_dim(&self) -> i32 {
        unsafe { ffi::moas_model_head_dim(self.as_ptr()) }
    }
    pub fn n_vocab(&self) -> i32 {
        unsafe { ffi::moas_model_n_vocab(self.as_ptr()) }
    }
    pub fn n_ctx_train(&self) -> i32 {
        unsafe { ffi::moas_model_n_ctx_train(self.as_ptr()) }
    }
    pub fn n_scheme(&self) -> i32 {
        unsafe { ffi::moas_model_n_scheme(self.as_ptr()) }
    }

    /// KV heads per token of each scheme, e.g. [6, 2, 1] (MHA, GQA, MQA).
    pub fn schemes(&self) -> Vec<i32> {
        (0..self.n_scheme())
            .map(|s| unsafe { ffi::moas_model_scheme_n_kv(self.as_ptr(), s) })
            .collect()
    }

    /// An integer metadata value (moas_model_meta_int).
    pub fn meta_int(&self, key: &str) -> Result<i64> {
        let key = cstring(key)?;
        let mut v = 0;
        check(unsafe { ffi::moas_model_meta_int(self.as_ptr(), key.as_ptr(), &mut v) })?;
        Ok(v)
    }

    /// Token ids of `text`, one per character (moas_tokenize).
    pub fn tokenize(&self, text: &str) -> Result<Vec<i32>> {
        let mut ids = vec![0i32; text.len()]; // one id per character: at most one per byte
        let mut n = 0usize;
        check(unsafe {
            ffi::moas_tokenize(
                self.as_ptr(),
                text.as_ptr().cast(),
                text.len(),
                ids.as_mut_ptr(),
                ids.len(),
                &mut n,
            )
        })?;
        ids.truncate(n);
        Ok(ids)
    }

    /// Token ids of `text` with characters outside the vocabulary replaced by the token
    /// `replacement` (Some) or dropped (None), and how many were (moas_tokenize_ex).
    pub fn tokenize_lenient(
        &self,
        text: &str,
        replacement: Option<i32>,
    ) -> Result<(Vec<i32>, usize)> {
        let mut p = params(ffi::moas_tokenize_params_init_sized);
        p.unknown = if replacement.is_some() {
            ffi::MOAS_UNKNOWN_REPLACE
        } else {
            ffi::MOAS_UNKNOWN_DROP
        };
        p.replacement = replacement.unwrap_or(-1);
        let mut ids = vec![0i32; text.len()];
        let (mut n, mut changed) = (0usize, 0usize);
        check(unsafe {
            ffi::moas_tokenize_ex(
                self.as_ptr(),
                text.as_ptr().cast(),
                text.len(),
                &p,
                ids.as_mut_ptr(),
                ids.len(),
                &mut n,
                &mut changed,
            )
        })?;
        ids.truncate(n);
        Ok((ids, changed))
    }

    /// The text of `tokens` (moas_detokenize).
    pub fn detokenize(&self, tokens: &[i32]) -> Result<String> {
        let mut buf = vec![0u8; 4 * tokens.len() + 1]; // a character is at most 4 bytes
        let mut len = 0usize;
        check(unsafe {
            ffi::moas_detokenize(
                self.as_ptr(),
                tokens.as_ptr(),
                tokens.len(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut len,
            )
        })?;
        buf.truncate(len);
        String::from_utf8(buf).map_err(|e| Error::invalid(e.to_string()))
    }

    /// The text of one token; None outside [0, n_vocab).
    pub fn token_text(&self, token: i32) -> Option<&str> {
        unsafe { text(ffi::moas_token_text(self.as_ptr(), token)) }
    }
}

/// The name and sizes, e.g. `Model { name: "tiny", n_vocab: 47, n_layer: 2, n_scheme: 3 }`.
impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name())
            .field("n_vocab", &self.n_vocab())
            .field("n_layer", &self.n_layer())
            .field("n_scheme", &self.n_scheme())
            .finish()
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        unsafe { ffi::moas_model_free(self.ptr.as_ptr()) }
    }
}

// ---- context --------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every scheme runs, outputs mixed as trained (exact).
    Mixture,
    /// One scheme per token and layer; only its K/V are stored.
    Routed,
}

/// Which kernels a context or pool runs (moas_kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The fastest the CPU has (AVX-512, AVX2 or the reference), chosen at run time.
    Auto,
    /// The reference kernels: plain C whose bits every machine reproduces (slower); for
    /// results compared across machines.
    Ref,
}

impl Kernels {
    fn raw(self) -> i32 {
        match self {
            Kernels::Auto => ffi::MOAS_KERNELS_AUTO,
            Kernels::Ref => ffi::MOAS_KERNELS_REF,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
    /// Blocks of 32 along each head (head_dim a multiple of 32).
    Q8_0,
}

/// moas_context_params, the fields a Rust caller sets. Default: the C defaults. Build it
/// with `..Default::default()`: fields are added as the C struct grows.
#[derive(Clone, Debug)]
pub struct ContextParams {
    pub n_ctx: i32,     // 0: the trained length
    pub n_threads: i32, // 0: every CPU the process may run on, within its cgroup's CPU quota
    pub mode: Mode,
    pub kv_type: KvType,
    pub forced_scheme: Option<i32>, // routed mode: this scheme for every token
    pub kv_budget: u64,             // bytes, 0: none
    /// Tokens per block of the context's own calls (decode, decode_batch; not
    /// Pool::decode, whose blocks are the pool's); 0: 128, or n_ctx if smaller. Below
    /// 64 its attention scratch is a quarter: for a context in a Pool decoded mostly
    /// by Pool::decode.
    pub n_batch: i32,
    /// A context of its own (not of a Pool, whose kernels it takes): which kernels
    /// ([`Context::kernels_name`] says which ran).
    pub kernels: Kernels,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 0,
            n_threads: 0,
            mode: Mode::Mixture,
            kv_type: KvType::F32,
            forced_scheme: None,
            kv_budget: 0,
            n_batch: 0,
            kernels: Kernels::Auto,
        }
    }
}

/// The routing of a range of positions, flattened position-major as in moas.h.
/// [`Context::route_table`] gives the same vectors with their dimensions.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    pub gates: Vec<f32>,    // [n_pos][n_layer][n_scheme]
    pub schemes: Vec<i32>,  // [n_pos][n_layer]
    pub kv_heads: Vec<i32>, // [n_pos][n_layer]
}

/// The routing of a range of positions with its shape, from [`Context::route_table`]:
/// the [`Routes`] that [`Context::routes`] returns and the sizes that index them.
///
/// `gates` is `[n_tokens][n_layer][n_scheme]`, `schemes` and `kv_heads` are
/// `[n_tokens][n_layer]`, position-major; token `t` is position `first_pos() + t`.
/// (A type of its own, so that `Routes`, whose fields are all public, stays as it was.)
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: Routes,
    first_pos: i32,
    n_tokens: usize,
    n_layer: usize,
    n_scheme: usize,
}

impl RouteTable {
    /// Positions in the range (n_pos of the call).
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }
    /// Layers per position: the model's n_layer.
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }
    /// Gates per token and layer: the model's n_scheme.
    pub fn n_scheme(&self) -> usize {
        self.n_scheme
    }
    /// `(n_tokens, n_layer, n_scheme)`, the shape of `gates`; `schemes` and `kv_heads`
    /// have the first two.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.n_tokens, self.n_layer, self.n_scheme)
    }
    /// The position of token 0 (pos of the call).
    pub fn first_pos(&self) -> i32 {
        self.first_pos
    }

    /// The index of (token, layer) in `schemes` and `kv_heads`; None outside the shape.
    fn pair(&self, token: usize, layer: usize) -> Option<usize> {
        if token < self.n_tokens && layer < self.n_layer {
            Some(token * self.n_layer + layer)
        } else {
            None
        }
    }
    /// The n_scheme gates of `token` (0-based in the range) in `layer`; None outside
    /// the shape.
    pub fn gates_at(&self, token: usize, layer: usize) -> Option<&[f32]> {
        let i = self.pair(token, layer)? * self.n_scheme;
        self.routes.gates.get(i..i + self.n_scheme)
    }
    /// The scheme `token` used in `layer` (routed mode; the largest gate in mixture
    /// mode); None outside the shape.
    pub fn scheme_at(&self, token: usize, layer: usize) -> Option<i32> {
        self.routes.schemes.get(self.pair(token, layer)?).copied()
    }
    /// KV heads stored for `token` in `layer`; None outside the shape.
    pub fn kv_heads_at(&self, token: usize, layer: usize) -> Option<i32> {
        self.routes.kv_heads.get(self.pair(token, layer)?).copied()
    }

    /// The flat vectors.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }
    /// The flat vectors, owned.
    pub fn into_routes(self) -> Routes {
        self.routes
    }
}

impl AsRef<Routes> for RouteTable {
    fn as_ref(&self) -> &Routes {
        &self.routes
    }
}

impl From<RouteTable> for Routes {
    fn from(table: RouteTable) -> Routes {
        table.routes
    }
}

/// One routing decision offered to a route callback: a token at `pos` in `layer`, the
/// router's gates (one per scheme) and the scheme the context would use (the forced
/// one if set, else the largest gate).
#[derive(Debug)]
pub struct RouteEvent<'a> {
    pub pos: i32,
    pub layer: i32,
    pub gates: &'a [f32],
    pub proposed: i32,
}

/// A route callback as the hook keeps it.
type RouteFn<'m> = dyn FnMut(&RouteEvent<'_>) -> Option<i32> + Send + 'm;

/// A context's route callback and a panic it raised during the call under way. The C
/// context holds a raw pointer to it (Box::into_raw), and Rust reaches it only through
/// that same pointer, so no reference of Rust's invalidates the one C calls through.
struct RouteHook<'m> {
    f: Box<RouteFn<'m>>,
    panic: Option<Box<dyn Any + Send>>,
}

/// moas_route_fn for every Context: runs the hook's closure. A panic must not unwind
/// into C: it is kept (the token keeps `proposed`, the hook is not called again in
/// that call) and raised again when the decoding call returns.
unsafe extern "C" fn route_trampoline(
    user: *mut c_void,
    pos: i32,
    layer: i32,
    gates: *const f32,
    n_scheme: i32,
    proposed: i32,
) -> i32 {
    let hook = unsafe { &mut *(user as *mut RouteHook<'_>) };
    if hook.panic.is_some() {
        return proposed;
    }
    let event = RouteEvent {
        pos,
        layer,
        gates: unsafe { std::slice::from_raw_parts(gates, n_scheme as usize) },
        proposed,
    };
    match panic::catch_unwind(AssertUnwindSafe(|| (hook.f)(&event))) {
        Ok(choice) => choice.unwrap_or(proposed),
        Err(payload) => {
            hook.panic = Some(payload);
            proposed
        }
    }
}

/// An abort callback as the hook keeps it: true stops the call.
type AbortFn<'m> = dyn FnMut() -> bool + Send + 'm;

/// A context's abort callback and a panic it raised during the call under way, held
/// as [`RouteHook`] is.
struct AbortHook<'m> {
    f: Box<AbortFn<'m>>,
    panic: Option<Box<dyn Any + Send>>,
}

/// moas_abort_fn for every Context: runs the hook's closure. A panic must not unwind
/// into C: it is kept, stops the call (which the library undoes, as any stop) and is
/// raised again when the decoding call returns.
unsafe extern "C" fn abort_trampoline(user: *mut c_void) -> i32 {
    let hook = unsafe { &mut *(user as *mut AbortHook<'_>) };
    if hook.panic.is_some() {
        return 1;
    }
    match panic::catch_unwind(AssertUnwindSafe(|| (hook.f)())) {
        Ok(stop) => i32::from(stop),
        Err(payload) => {
            hook.panic = Some(payload);
            1
        }
    }
}

/// An inference stream over a model it borrows. One thread at a time (Send, not Sync).
pub struct Context<'m> {
    ptr: NonNull<ffi::moas_context>,
    n_vocab: usize,
    n_layer: usize,
    n_scheme: usize,
    route: Option<NonNull<RouteHook<'m>>>, // owned (Box::into_raw); C's route_user
    abort: Option<NonNull<AbortHook<'m>>>, // owned (Box::into_raw); C's abort_user
    _model: PhantomData<&'m Model>,
}

unsafe impl Send for Context<'_> {}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, p: &ContextParams) -> Result<Context<'m>> {
        Context::create(model, p, ptr::null_mut())
    }

    fn create(
        model: &'m Model,
        p: &ContextParams,
        pool: *mut ffi::moas_pool,
    ) -> Result<Context<'m>> {
        let mut c = params(ffi::moas_context_params_init_sized);
        c.pool = pool;
        c.n_ctx = p.n_ctx;
        c.n_threads = p.n_threads;
        c.mode = match p.mode {
            Mode::Mixture => ffi::MOAS_MODE_MIXTURE,
            Mode::Routed => ffi::MOAS_MODE_ROUTED,
        };
        c.kv_type = match p.kv_type {
            KvType::F32 => ffi::MOAS_TYPE_F32,
            KvType::F16 => ffi::MOAS_TYPE_F16,
            KvType::Q8_0 => ffi::MOAS_TYPE_Q8_0,
        };
        c.forced_scheme = p.forced_scheme.unwrap_or(-1);
        c.kv_budget_bytes = p.kv_budget;
        c.n_batch = p.n_batch;
        c.kernels = p.kernels.raw();
        let mut out = ptr::null_mut();
        check(unsafe { ffi::moas_context_create(model.as_ptr(), &c, &mut out) })?;
        Ok(Context {
            ptr: NonNull::new(out).expect("OK and NULL"),
            n_vocab: model.n_vocab() as usize,
            n_layer: model.n_layer() as usize,
            n_scheme: model.n_scheme() as usize,
            route: None,
            abort: None,
            _model: PhantomData,
        })
    }

    fn raw(&self) -> *const ffi::moas_context {
        self.ptr.as_ptr()
    }

    /// The C context, for calls this crate does not wrap (as [`Model::as_ptr`]). The C
    /// calls that change a context take a `*mut`: cast it (`as *mut _`). It stays valid
    /// as long as the Context, and the crate's rules are still the C API's: one thread
    /// at a time, and a call from a route callback into the context being decoded is
    /// refused with [`ErrorKind::Busy`].
    pub fn as_ptr(&self) -> *const ffi::moas_context {
        self.ptr.as_ptr()
    }

    /// A new context that continues from this one's tokens in the same pool, sharing
    /// its full KV pages copy on write (moas_context_fork); needs a context of a Pool.
    /// The fork has no route or abort callback (a closure cannot be shared): set its
    /// own.
    pub fn fork(&mut self) -> Result<Context<'m>> {
        let mut out = ptr::null_mut();
        check(unsafe { ffi::moas_context_fork(self.ptr.as_ptr(), &mut out) })?;
        // the C fork copies the parent's callbacks, whose user pointers are our hooks
        unsafe { ffi::moas_context_set_route_callback(out, None, ptr::null_mut()) };
        unsafe { ffi::moas_context_set_abort_callback(out, None, ptr::null_mut()) };
        Ok(Context {
            ptr: NonNull::new(out).expect("OK and NULL"),
            n_vocab: self.n_vocab,
            n_layer: self.n_layer,
            n_scheme: self.n_scheme,
            route: None,
            abort: None,
            _model: PhantomData,
        })
    }

    /// Call `f` for every token and layer as it is decoded, after the router and before
    /// the layer's attention (moas_context_set_route_callback). In routed mode
    /// `Some(scheme)` runs that scheme (a KV budget may still make it cheaper; a value
    /// outside [0, n_scheme) keeps the proposed one) and `None` keeps the proposed one;
    /// in mixture mode the answer is ignored. The closure runs on the decoding thread
    /// and cannot reach this context (it is being decoded). Should it panic, the token
    /// keeps its proposed scheme, the closure is not called again during that call, and
    /// the panic resumes when the decoding call (decode, decode_batch, decode_batch_logits,
    /// Pool::decode, Pool::decode_logits) returns.
    pub fn set_route_callback<F>(&mut self, f: F)
    where
        F: FnMut(&RouteEvent<'_>) -> Option<i32> + Send + 'm,
    {
        let hook = Box::into_raw(Box::new(RouteHook {
            f: Box::new(f),
            panic: None,
        }));
        unsafe {
            ffi::moas_context_set_route_callback(
                self.ptr.as_ptr(),
                Some(route_trampoline),
                hook as *mut c_void,
            )
        };
        // the old hook, if any, after C stopped pointing at it
        self.free_route_hook();
        self.route = NonNull::new(hook);
    }

    /// Remove the route callback: the router alone decides again.
    pub fn clear_route_callback(&mut self) {
        unsafe { ffi::moas_context_set_route_callback(self.ptr.as_ptr(), None, ptr::null_mut()) };
        self.free_route_hook();
    }

    /// Free the hook once the C context no longer calls it.
    fn free_route_hook(&mut self) {
        if let Some(hook) = self.route.take() {
            drop(unsafe { Box::from_raw(hook.as_ptr()) });
        }
    }

    /// Ask `f` before each block of tokens of a decoding call and between the layers of
    /// a block, on the decoding thread (moas_context_set_abort_callback): `true` stops
    /// the call with [`ErrorKind::Aborted`], and the call is undone, the context holding
    /// the tokens, pages and routing records it had before it, and no logits
    /// (`logits()` is None) until its next decode. In a Pool::decode any context's
    /// callback stops the whole call, every context in it undone. The typical closure
    /// reads an `AtomicBool` another thread sets, or a deadline. Should it panic, the
    /// call is stopped the same way and the panic resumes when the decoding call
    /// returns.
    pub fn set_abort_callback<F>(&mut self, f: F)
    where
        F: FnMut() -> bool + Send + 'm,
    {
        let hook = Box::into_raw(Box::new(AbortHook {
            f: Box::new(f),
            panic: None,
        }));
        unsafe {
            ffi::moas_context_set_abort_callback(
                self.ptr.as_ptr(),
                Some(abort_trampoline),
                hook as *mut c_void,
            )
        };
        // the old hook, if any, after C stopped pointing at it
        self.free_abort_hook();
        self.abort = NonNull::new(hook);
    }

    /// Remove the abort callback: decoding calls run to their end again.
    pub fn clear_abort_callback(&mut self) {
        unsafe { ffi::moas_context_set_abort_callback(self.ptr.as_ptr(), None, ptr::null_mut()) };
        self.free_abort_hook();
    }

    /// Free the hook once the C context no longer calls it.
    fn free_abort_hook(&mut self) {
        if let Some(hook) = self.abort.take() {
            drop(unsafe { Box::from_raw(hook.as_ptr()) });
        }
    }

    /// After a decoding call: the panic a callback (route, else abort) raised during it,
    /// taken, with the other's, so that none is left to surface after a later call.
    fn take_callback_panic(&mut self) -> Option<Box<dyn Any + Send>> {
        let route = self
            .route
            .and_then(|hook| unsafe { (*hook.as_ptr()).panic.take() });
        let abort = self
            .abort
            .and_then(|hook| unsafe { (*hook.as_ptr()).panic.take() });
        route.or(abort)
    }

    /// After a decoding call: resume a panic a callback raised during it.
    fn resume_callback_panic(&mut self) {
        if let Some(payload) = self.take_callback_panic() {
            panic::resume_unwind(payload);
        }
    }

    /// Bytes save_state() writes now (moas_context_state_size).
    pub fn state_size(&self) -> usize {
        unsafe { ffi::moas_context_state_size(self.raw()) }
    }

    /// The sequence as bytes: its K/V, routing records, position and logits.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.state_size()];
        let mut written = 0usize;
        check(unsafe {
            ffi::moas_context_state_save(
                self.raw(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut written,
            )
        })?;
        buf.truncate(written);
        Ok(buf)
    }

    /// Replace the sequence with one saved by save_state(); all or nothing.
    pub fn load_state(&mut self, state: &[u8]) -> Result<()> {
        check(unsafe {
            ffi::moas_context_state_load(self.ptr.as_ptr(), state.as_ptr().cast(), state.len())
        })
    }

    /// KV pages the context holds (moas_context_kv_pages).
    pub fn kv_pages(&self) -> i32 {
        unsafe { ffi::moas_context_kv_pages(self.raw()) }
    }

    /// Bytes of the KV pages the context holds, shared ones included
    /// (moas_context_kv_bytes_held): kv_pages() pages of the pool's page_bytes.
    pub fn kv_bytes_held(&self) -> usize {
        unsafe { ffi::moas_context_kv_bytes_held(self.raw()) }
    }

    /// Routed mode, pooled K/V: re-pool the stored MHA/GQA tokens before `n_before`
    /// down to `scheme`, freeing the pages this gains (moas_context_compact); returns
    /// the token-layer pairs changed.
    pub fn compact(&mut self, n_before: i32, scheme: i32) -> Result<i32> {
        let mut changed = 0i32;
        check(unsafe {
            ffi::moas_context_compact(self.ptr.as_ptr(), n_before, scheme, &mut changed)
        })?;
        Ok(changed)
    }

    /// RoPE models: drop tokens [n_keep, n_keep + n_discard) and move the later ones
    /// down, their keys turned back, nothing decoded again (moas_context_shift).
    pub fn shift(&mut self, n_keep: i32, n_discard: i32) -> Result<()> {
        check(unsafe { ffi::moas_context_shift(self.ptr.as_ptr(), n_keep, n_discard) })
    }

    /// Decode one token; its logits are then in logits().
    pub fn decode(&mut self, token: i32) -> Result<()> {
        let st = unsafe { ffi::moas_context_decode(self.ptr.as_ptr(), token, ptr::null_mut()) };
        self.resume_callback_panic();
        check(st)
    }

    /// Decode consecutive tokens, all or none; the last one's logits are in logits().
    pub fn decode_batch(&mut self, tokens: &[i32]) -> Result<()> {
        let n =
            i32::try_from(tokens.len()).map_err(|_| Error::invalid("too many tokens".into()))?;
        let st = unsafe {
            ffi::moas_context_decode_batch(
                self.ptr.as_ptr(),
                tokens.as_ptr(),
                n,
                ptr::null_mut(),
                ffi::MOAS_LOGITS_LAST,
            )
        };
        self.resume_callback_panic();
        check(st)
    }

    /// Decode consecutive tokens, all or none, and return the logits `which` asks for:
    /// nothing (Logits::None, a prompt whose logits nobody reads), the last token's
    /// n_vocab (Logits::Last, also in logits()) or every token's, n_tokens x n_vocab
    /// in token order (Logits::All).
    pub fn decode_batch_logits(&mut self, tokens: &[i32], which: Logits) -> Result<Vec<f32>> {
        let n =
            i32::try_from(tokens.len()).map_err(|_| Error::invalid("too many tokens".into()))?;
        self.check_room(tokens.len(), which, None)?;
        let mut out = vec![0.0f32; which.floats(tokens.len(), self.n_vocab)?];
        let st = unsafe {
            ffi::moas_context_decode_batch(
                self.ptr.as_ptr(),
                tokens.as_ptr(),
                n,
                if out.is_empty() {
                    ptr::null_mut()
                } else {
                    out.as_mut_ptr()
                },
                which.raw(),
            )
        };
        self.resume_callback_panic();
        check(st)?;
        Ok(out)
    }

    /// MOAS_ERR_CONTEXT_FULL, as the library would say it, when every token's logits are
    /// asked for tokens that do not fit: before a buffer sized by the caller's count.
    /// The message names the call: decode_batch, or a pool's decode and its sequence `seq`.
    fn check_room(&self, n_tokens: usize, which: Logits, seq: Option<usize>) -> Result<()> {
        let (n_past, n_ctx) = (self.n_past(), self.n_ctx());
        if matches!(which, Logits::All) && n_tokens > usize::try_from(n_ctx - n_past).unwrap_or(0) {
            let what = match seq {
                Some(i) => format!("pool decode: sequence {i}"),
                None => "decode_batch".to_string(),
            };
            return Err(Error {
                status: ffi::MOAS_ERR_CONTEXT_FULL,
                message: format!(
                    "{what}: {n_tokens} tokens after {n_past} do not fit a context of {n_ctx}"
                ),
            });
        }
        Ok(())
    }

    /// The last decoded token's logits, in the library's buffer (no copy); None when
    /// nothing was decoded since creation, reset or truncate, or the last call asked for
    /// none (Logits::None).
    pub fn logits(&self) -> Option<&[f32]> {
        let p = unsafe { ffi::moas_context_logits(self.raw()) };
        (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    pub fn n_past(&self) -> i32 {
        unsafe { ffi::moas_context_n_past(self.raw()) }
    }
    pub fn n_ctx(&self) -> i32 {
        unsafe { ffi::moas_context_n_ctx(self.raw()) }
    }
    /// The mode the context was created in.
    pub fn mode(&self) -> Mode {
        match unsafe { ffi::moas_context_mode(self.raw()) } {
            ffi::MOAS_MODE_ROUTED => Mode::Routed,
            _ => Mode::Mixture,
        }
    }
    pub fn kernels_name(&self) -> &str {
        unsafe { text(ffi::moas_context_kernels_name(self.raw())) }.unwrap_or("")
    }

    pub fn truncate(&mut self, n_keep: i32) -> Result<()> {
        check(unsafe { ffi::moas_context_truncate(self.ptr.as_ptr(), n_keep) })
    }
    pub fn reset(&mut self) {
        unsafe { ffi::moas_context_reset(self.ptr.as_ptr()) }
    }

    /// Routed mode: use `scheme` for every following token, or the router for None.
    pub fn force_scheme(&mut self, scheme: Option<i32>) -> Result<()> {
        check(unsafe { ffi::moas_context_force_scheme(self.ptr.as_ptr(), scheme.unwrap_or(-1)) })
    }

    /// Cap the KV bytes the context may use (moas_context_set_kv_budget); 0 removes the
    /// cap, as [`Context::clear_kv_budget`] does.
    pub fn set_kv_budget(&mut self, bytes: u64) -> Result<()> {
        check(unsafe { ffi::moas_context_set_kv_budget(self.ptr.as_ptr(), bytes) })
    }

    /// Remove the KV budget: `set_kv_budget(0)` by its name.
    pub fn clear_kv_budget(&mut self) -> Result<()> {
        self.set_kv_budget(0)
    }

    /// Routing of positions [pos, pos + n_pos).
    pub fn routes(&self, pos: i32, n_pos: i32) -> Result<Routes> {
        // buffers only for a range the context holds: outside it the library refuses
        // before writing, and sizing them from n_pos first could ask for gigabytes
        let held =
            pos >= 0 && n_pos >= 0 && i64::from(pos) + i64::from(n_pos) <= i64::from(self.n_past());
        let pairs = if held {
            n_pos as usize * self.n_layer
        } else {
            0
        };
        let mut r = Routes {
            gates: vec![0.0; pairs * self.n_scheme],
            schemes: vec![0; pairs],
            kv_heads: vec![0; pairs],
        };
        check(unsafe {
            ffi::moas_context_routes(
                self.raw(),
                pos,
                n_pos,
                r.gates.as_mut_ptr(),
                r.schemes.as_mut_ptr(),
                r.kv_heads.as_mut_ptr(),
            )
        })?;
        Ok(r)
    }

    /// Routing of positions [pos, pos + n_pos) with its shape: the vectors of
    /// [`Context::routes`] and their n_tokens, n_layer and n_scheme ([`RouteTable`]).
    pub fn route_table(&self, pos: i32, n_pos: i32) -> Result<RouteTable> {
        let routes = self.routes(pos, n_pos)?;
        Ok(RouteTable {
            routes,
            first_pos: pos,
            n_tokens: n_pos as usize, // routes() refused a negative n_pos
            n_layer: self.n_layer,
            n_scheme: self.n_scheme,
        })
    }

    /// Stored tokens per scheme in `layer`, or token-layer pairs over all layers for -1.
    pub fn scheme_counts(&self, layer: i32) -> Result<Vec<i32>> {
        let mut counts = vec![0; self.n_scheme];
        check(unsafe { ffi::moas_context_scheme_counts(self.raw(), layer, counts.as_mut_ptr()) })?;
        Ok(counts)
    }

    /// Token-layer pairs per scheme over all layers: `scheme_counts(-1)` by its name.
    pub fn scheme_counts_total(&self) -> Result<Vec<i32>> {
        self.scheme_counts(-1)
    }

    /// Bytes of K/V stored in `layer`, or in all layers for -1.
    pub fn kv_bytes_used(&self, layer: i32) -> usize {
        unsafe { ffi::moas_context_kv_bytes_used(self.raw(), layer) }
    }
    pub fn kv_bytes_reserved(&self, layer: i32) -> usize {
        unsafe { ffi::moas_context_kv_bytes_reserved(self.raw(), layer) }
    }
    /// Bytes of K/V stored in all layers: `kv_bytes_used(-1)` by its name.
    pub fn kv_bytes_used_total(&self) -> usize {
        self.kv_bytes_used(-1)
    }
    /// Bytes allocated for K/V in all layers: `kv_bytes_reserved(-1)` by its name.
    pub fn kv_bytes_reserved_total(&self) -> usize {
        self.kv_bytes_reserved(-1)
    }
    /// Bytes of K/V stored in one `layer`; None for a layer outside [0, n_layer), where
    /// kv_bytes_used() says 0 as for an empty layer.
    pub fn kv_bytes_used_in(&self, layer: i32) -> Option<usize> {
        self.has_layer(layer).then(|| self.kv_bytes_used(layer))
    }
    /// Bytes allocated for K/V in one `layer`; None for a layer outside [0, n_layer).
    pub fn kv_bytes_reserved_in(&self, layer: i32) -> Option<usize> {
        self.has_layer(layer).then(|| self.kv_bytes_reserved(layer))
    }
    fn has_layer(&self, layer: i32) -> bool {
        usize::try_from(layer).map_or(false, |l| l < self.n_layer)
    }

    /// Bytes one token occupies over all layers: mixture storage for -1, routed
    /// storage of `scheme` otherwise (0 for a scheme out of range).
    pub fn kv_token_bytes(&self, scheme: i32) -> u64 {
        unsafe { ffi::moas_context_kv_token_bytes(self.raw(), scheme) }
    }
    /// Bytes one token occupies over all layers in mixture mode's storage (every
    /// scheme's K/V): `kv_token_bytes(-1)` by its name.
    pub fn kv_token_bytes_mixture(&self) -> u64 {
        self.kv_token_bytes(-1)
    }
    /// Bytes one token routed to `scheme` in every layer occupies, bookkeeping included;
    /// None for a scheme outside [0, n_scheme), where kv_token_bytes() says 0.
    pub fn kv_token_bytes_routed(&self, scheme: i32) -> Option<u64> {
        let known = usize::try_from(scheme).map_or(false, |s| s < self.n_scheme);
        known.then(|| self.kv_token_bytes(scheme))
    }
    /// Threads a decoding call uses.
    pub fn n_threads(&self) -> i32 {
        unsafe { ffi::moas_context_n_threads(self.raw()) }
    }
}

/// Where the sequence is, e.g.
/// `Context { n_past: 3, n_ctx: 64, mode: Routed, kernels: "avx512",
/// route_callback: false, abort_callback: false }`.
impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("n_past", &self.n_past())
            .field("n_ctx", &self.n_ctx())
            .field("mode", &self.mode())
            .field("kernels", &self.kernels_name())
            .field("route_callback", &self.route.is_some())
            .field("abort_callback", &self.abort.is_some())
            .finish()
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        unsafe { ffi::moas_context_free(self.ptr.as_ptr()) }
        self.free_route_hook();
        self.free_abort_hook();
    }
}

// ---- sampler --------------------------------------------------------------------------

/// moas_sampler_params. Default: the C defaults (temperature 1, all tokens, seed 0, no
/// min-p, no repetition, frequency or presence penalty over the last 64 tokens, no
/// logit biases). Build it with `..Default::default()`: fields are added as the C
/// struct grows.
#[derive(Clone, Debug)]
pub struct SamplerParams {
    pub temperature: f32, // 0: greedy
    pub top_k: i32,       // 0: all
    pub top_p: f32,       // 1: all
    pub seed: u64,
    pub min_p: f32,          // 0: off
    pub repeat_penalty: f32, // 1: off
    pub repeat_last_n: i32,
    pub logit_bias: Vec<(i32, f32)>, // (token, bias); f32::NEG_INFINITY bans
    /// Subtracted from a token's logit once per time it is among the last
    /// repeat_last_n, after the repetition penalty (OpenAI's); 0: off.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of each token among the last repeat_last_n; 0: off.
    pub presence_penalty: f32,
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            logit_bias: Vec::new(),
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

pub struct Sampler {
    ptr: NonNull<ffi::moas_sampler>,
    n_vocab: usize,
}

unsafe impl Send for Sampler {}

impl Sampler {
    pub fn new(n_vocab: i32, p: &SamplerParams) -> Result<Sampler> {
        let mut c = params(ffi::moas_sampler_params_init_sized);
        c.temperature = p.temperature;
        c.top_k = p.top_k;
        c.top_p = p.top_p;
        c.seed = p.seed;
        c.min_p = p.min_p;
        c.repeat_penalty = p.repeat_penalty;
        c.repeat_last_n = p.repeat_last_n;
        c.frequency_penalty = p.frequency_penalty;
        c.presence_penalty = p.presence_penalty;
        let bias: Vec<ffi::moas_logit_bias> = p
            .logit_bias
            .iter()
            .map(|&(token, bias)| ffi::moas_logit_bias { token, bias })
            .collect();
        c.n_logit_bias = i32::try_from(bias.len())
            .map_err(|_| Error::invalid("too many logit biases".into()))?;
        c.logit_bias = if bias.is_empty() {
            ptr::null()
        } else {
            bias.as_ptr()
        };
        let mut out = ptr::null_mut();
        // the library copies the biases during the call
        check(unsafe { ffi::moas_sampler_create(&c, n_vocab, &mut out) })?;
        Ok(Sampler {
            ptr: NonNull::new(out).expect("OK and NULL"),
            n_vocab: n_vocab as usize,
        })
    }

    /// A token chosen from `logits`, which must hold n_vocab values.
    pub fn sample(&mut self, logits: &[f32]) -> Result<i32> {
        if logits.len() != self.n_vocab {
            return Err(Error::invalid(format!(
                "{} logits, the sampler needs {}",
                logits.len(),
                self.n_vocab
            )));
        }
        let mut token = 0;
        check(unsafe { ffi::moas_sampler_sample(self.ptr.as_ptr(), logits.as_ptr(), &mut token) })?;
        Ok(token)
    }

    /// A token chosen from the logits of the last token `ctx` decoded, read in place
    /// from the library's buffer ([`Context::logits`]): `sample(ctx.logits()?)` without
    /// the match. The C API samples from a float array, so this is that call on the
    /// context's buffer. Fails with [`ErrorKind::InvalidArg`] when the context has no
    /// logits (nothing decoded since creation, reset or truncate, or a last call that
    /// asked for none) or when its model's n_vocab is not the sampler's.
    pub fn sample_context(&mut self, ctx: &Context<'_>) -> Result<i32> {
        match ctx.logits() {
            Some(logits) => self.sample(logits),
            None => Err(Error::invalid(
                "sample_context: the context has no logits (nothing decoded since it was \
                 created, reset or truncated, or its last decode asked for none)"
                    .into(),
            )),
        }
    }

    pub fn reseed(&mut self, seed: u64) {
        unsafe { ffi::moas_sampler_reseed(self.ptr.as_ptr(), seed) }
    }

    /// Remember `token` for the repetition penalty, as if sampled (a prompt's tokens).
    pub fn accept(&mut self, token: i32) -> Result<()> {
        check(unsafe { ffi::moas_sampler_accept(self.ptr.as_ptr(), token) })
    }

    /// Forget the tokens remembered for the repetition penalty.
    pub fn reset(&mut self) {
        unsafe { ffi::moas_sampler_reset(self.ptr.as_ptr()) }
    }
}

/// The sampler's vocabulary size (the library reports nothing else of it).
impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        unsafe { ffi::moas_sampler_free(self.ptr.as_ptr()) }
    }
}

// ---- stop strings ----------------------------------------------------------------------

/// Where generated text meets a stop string, as [`find_stop`] says. Offsets are bytes,
/// always on a character boundary of the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A stop string begins whole here: keep `text[..at]` and stop generating.
    Found(usize),
    /// None occurs whole: `text[..end]` can be shown. While more text may follow, the
    /// rest is the start of a stop string, held back to be looked at again with the text
    /// that follows; at the end of generation it is empty.
    Show(usize),
}

/// Look in `text`, generated and not yet shown, for the first place where one of `stops`
/// occurs whole, else where one begins and is cut off by the end of the text
/// (moas_text_find_stop; empty ones are ignored). `more`: more text may follow.
pub fn find_stop<S: AsRef<str>>(text: &str, stops: &[S], more: bool) -> Result<Stop> {
    // a stop string with a NUL byte is refused: C would see it end there
    let owned = stops
        .iter()
        .map(|s| cstring(s.as_ref()))
        .collect::<Result<Vec<CString>>>()?;
    let pointers: Vec<*const c_char> = owned.iter().map(|s| s.as_ptr()).collect();
    let (mut end, mut found) = (0usize, 0i32);
    check(unsafe {
        ffi::moas_text_find_stop(
            text.as_ptr().cast(),
            text.len(),
            pointers.as_ptr(),
            pointers.len(),
            i32::from(more),
            &mut end,
            &mut found,
        )
    })?;
    Ok(if found != 0 {
        Stop::Found(end)
    } else {
        Stop::Show(end)
    })
}

// ---- KV pool ---------------------------------------------------------------------------

/// Which logits a batched decode returns (moas_logits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

impl Logits {
    fn raw(self) -> ffi::moas_logits {
        match self {
            Logits::None => ffi::MOAS_LOGITS_NONE,
            Logits::Last => ffi::MOAS_LOGITS_LAST,
            Logits::All => ffi::MOAS_LOGITS_ALL,
        }
    }

    /// Floats the library writes for n_tokens tokens.
    fn floats(self, n_tokens: usize, n_vocab: usize) -> Result<usize> {
        match self {
            Logits::None => Ok(0),
            Logits::Last if n_tokens == 0 => Ok(0),
            Logits::Last => Ok(n_vocab),
            Logits::All => n_tokens
                .checked_mul(n_vocab)
                .ok_or_else(|| Error::invalid("too many logits for this address space".into())),
        }
    }
}

/// A KV pool many contexts of one model take pages from (moas_pool). Contexts made by
/// context() borrow it, so they cannot outlive it.
pub struct Pool<'m> {
    ptr: NonNull<ffi::moas_pool>,
    model: &'m Model,
}

unsafe impl Send for Pool<'_> {}
// Shared between threads: moas_pool_stats() and creating contexts in the pool are safe
// alongside anything else, and a second moas_pool_decode() while one is under way is
// refused, not run; the contexts a decode takes are borrowed mutably, so no other call
// can reach them meanwhile.
unsafe impl Sync for Pool<'_> {}

/// What moas_pool_stats() reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    pub page_heads: i32,
    pub page_bytes: u64,
    pub n_pages: i32,
    pub pages_free: i32,
    pub n_contexts: i32,
    pub bytes_capacity: u64,
    pub bytes_held: u64,
    pub bytes_used: u64,
    pub bytes_stored: u64,
    pub n_threads: i32, // of Pool::decode: as given, or for 0 what it resolved to
}

/// moas_pool_params, the fields a Rust caller sets. Default: the C defaults (a
/// capacity must still be given). Build it with `..Default::default()`: fields are
/// added as the C struct grows (`kernels` was).
#[derive(Clone, Debug)]
pub struct PoolParams {
    pub capacity_bytes: u64,
    pub kv_type: KvType,
    pub page_heads: i32,  // head slots per page, a power of two; 0: 4
    pub n_threads: i32,   // threads of Pool::decode; 0: each CPU, within the cgroup quota
    pub n_batch: i32,     // rows per block of Pool::decode; 0: 128
    pub steer_below: f32, // routed contexts: steer to cheaper schemes below this free share
    pub commit: bool,     // write every page at creation (resident from the start)
    pub kernels: Kernels, // of Pool::decode and of the pool's contexts
}

impl Default for PoolParams {
    fn default() -> Self {
        PoolParams {
            capacity_bytes: 0,
            kv_type: KvType::F32,
            page_heads: 0,
            n_threads: 0,
            n_batch: 0,
            steer_below: 0.0,
            commit: false,
            kernels: Kernels::Auto,
        }
    }
}

impl<'m> Pool<'m> {
    /// A pool of `capacity_bytes` of pages of `kv_type` (moas_pool_create).
    pub fn new(model: &'m Model, capacity_bytes: u64, kv_type: KvType) -> Result<Pool<'m>> {
        Pool::with_params(
            model,
            &PoolParams {
                capacity_bytes,
                kv_type,
                ..Default::default()
            },
        )
    }

    /// A pool with every setting of moas_pool_params a Rust caller may set.
    pub fn with_params(model: &'m Model, pp: &PoolParams) -> Result<Pool<'m>> {
        let mut p = params(ffi::moas_pool_params_init_sized);
        p.capacity_bytes = pp.capacity_bytes;
        p.kv_type = match pp.kv_type {
            KvType::F32 => ffi::MOAS_TYPE_F32,
            KvType::F16 => ffi::MOAS_TYPE_F16,
            KvType::Q8_0 => ffi::MOAS_TYPE_Q8_0,
        };
        p.page_heads = pp.page_heads;
        p.n_threads = pp.n_threads;
        p.n_batch = pp.n_batch;
        p.steer_below = pp.steer_below;
        p.commit = pp.commit as i32;
        p.kernels = pp.kernels.raw();
        let mut out = ptr::null_mut();
        check(unsafe { ffi::moas_pool_create(model.as_ptr(), &p, &mut out) })?;
        Ok(Pool {
            ptr: NonNull::new(out).expect("OK and NULL"),
            model,
        })
    }

    /// The C pool, for calls this crate does not wrap (as [`Model::as_ptr`]); valid as
    /// long as the Pool.
    pub fn as_ptr(&self) -> *const ffi::moas_pool {
        self.ptr.as_ptr()
    }

    /// A context whose pages come from this pool (its kv_type is the pool's).
    pub fn context(&self, p: &ContextParams) -> Result<Context<'_>> {
        Context::create(self.model, p, self.ptr.as_ptr())
    }

    /// Advance every context by its tokens in one call (moas_pool_decode): each gets
    /// exactly what decode_batch would give it alone; its last logits are then in
    /// logits(). All or nothing.
    pub fn decode(&self, seqs: &mut [(&mut Context<'_>, &[i32])]) -> Result<()> {
        let mut with: Vec<(&mut Context<'_>, &[i32], Logits)> = seqs
            .iter_mut()
            .map(|(ctx, tokens)| (&mut **ctx, *tokens, Logits::Last))
            .collect();
        self.decode_into(&mut with, false).map(|_| ())
    }

    /// As decode(), each context with the logits it asks for (Context::decode_batch_logits):
    /// one vector per context, in order.
    pub fn decode_logits(
        &self,
        seqs: &mut [(&mut Context<'_>, &[i32], Logits)],
    ) -> Result<Vec<Vec<f32>>> {
        self.decode_into(seqs, true)
    }

    /// moas_pool_decode; with `copy`, each context's logits as `which` asks, else none
    /// copied out (the last ones stay in each context's logits()).
    fn decode_into(
        &self,
        seqs: &mut [(&mut Context<'_>, &[i32], Logits)],
        copy: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let n_seqs =
            i32::try_from(seqs.len()).map_err(|_| Error::invalid("too many contexts".into()))?;
        let mut outs = Vec::with_capacity(seqs.len());
        for (i, (ctx, tokens, which)) in seqs.iter().enumerate() {
            if i32::try_from(tokens.len()).is_err() {
                return Err(Error::invalid(format!("sequence {i}: too many tokens")));
            }
            let floats = if copy {
                ctx.check_room(tokens.len(), *which, Some(i))?;
                which.floats(tokens.len(), ctx.n_vocab)?
            } else {
                0
            };
            outs.push(vec![0.0f32; floats]);
        }
        let parts: Vec<ffi::moas_pool_seq> = seqs
            .iter_mut()
            .zip(outs.iter_mut())
            .map(|((ctx, tokens, which), out)| ffi::moas_pool_seq {
                ctx: ctx.ptr.as_ptr(),
                tokens: tokens.as_ptr(),
                n_tokens: tokens.len() as i32, // checked above
                which: which.raw(),
                logits: if out.is_empty() {
                    ptr::null_mut()
                } else {
                    out.as_mut_ptr()
                },
            })
            .collect();
        let st = unsafe { ffi::moas_pool_decode(self.ptr.as_ptr(), parts.as_ptr(), n_seqs) };
        // every context's panic taken (none left to surface in a later call), the first
        // resumed
        let mut first = None;
        for (ctx, _, _) in seqs.iter_mut() {
            if let Some(payload) = ctx.take_callback_panic() {
                first.get_or_insert(payload);
            }
        }
        if let Some(payload) = first {
            panic::resume_unwind(payload);
        }
        check(st)?;
        Ok(outs)
    }

    pub fn stats(&self) -> PoolStats {
        let mut info: ffi::moas_pool_info = unsafe { std::mem::zeroed() };
        info.size = std::mem::size_of::<ffi::moas_pool_info>() as u32;
        let _ = unsafe { ffi::moas_pool_stats(self.ptr.as_ptr(), &mut info) };
        PoolStats {
            page_heads: info.page_heads,
            page_bytes: info.page_bytes,
            n_pages: info.n_pages,
            pages_free: info.pages_free,
            n_contexts: info.n_contexts,
            bytes_capacity: info.bytes_capacity,
            bytes_held: info.bytes_held,
            bytes_used: info.bytes_used,
            bytes_stored: info.bytes_stored,
            n_threads: info.n_threads,
        }
    }
}

/// Its model's name and its occupancy now (moas_pool_stats).
impl fmt::Debug for Pool<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("model", &self.model.name())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        unsafe { ffi::moas_pool_free(self.ptr.as_ptr()) }
    }
}
