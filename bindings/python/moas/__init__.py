"""moas - Python bindings for libmoas (ctypes, standard library only).

libmoas runs character language models whose attention is a Mixture of Attention
Schemes (MoAS). This module wraps the whole C API of include/moas.h, which stays the
reference for what each call does; here are only the Python-specific rules.

    import moas
    with moas.Model("tests/data/tiny-moas-bias.gguf") as model, model.context() as ctx:
        logits = ctx.decode_batch(model.tokenize("And God"))   # zero-copy view
        token = moas.Sampler(model, temperature=0).sample(logits)
        print(model.token_text(token))

The library. It is found, in this order, at
  1. the path in the environment variable MOAS_LIBRARY (a .so file);
  2. `pkg-config --variable=libdir moas`, i.e. an installed libmoas;
  3. lib/ of the source tree this package sits in (bindings/python/moas/../../../lib).
It is loaded on first use; load_library(path) loads a given file instead.

Errors. Every failing call raises MoasError, which carries the status code
(`.status`, a Status), its name (`.name`, "MOAS_ERR_INVALID_ARG"), the library's fixed
sentence for it (`.status_string`) and the exact cause (`.message`, from
moas_last_error()). Calls on a closed object raise MoasError(MOAS_ERR_INVALID_ARG).

Lifetimes. Model, Context and Sampler own a C object each and release it on close(),
at the end of a `with` block, or when garbage collected. A Context keeps its Model
alive; closing a Model first closes the contexts made from it, as the C API requires.
A model loaded from bytes keeps those bytes alive (a writable buffer is exported, so a
bytearray cannot be resized while the model lives). Callbacks (route, abort, log,
allocator) are kept alive by the object they were given to.

Logits without copying. Context.logits() (and what decode() and decode_batch() return,
except decode_batch(..., logits="all"), which fills a new buffer of its own)
is a read-only memoryview of n_vocab floats over the library's own buffer. The next
decode, decode_batch, truncate, reset or close of that context releases the view, after
which any use of it raises ValueError. Buffers made from it (slices, casts,
memoryview(view), the numpy array of Context.logits_array(), which also keeps the view
itself from being released) are not released: they go on reading the same buffer, so
the next decode's logits replace the values they show; copy (`list(view)`,
`bytes(view)`, `array.copy()`) what must outlive the next decode. They (and the view
until it is released) never read freed memory: while any of them is alive the context's
library object (and so its Pool's and Model's) is not freed, even after close() of the
Context, Pool or Model or after their last reference is dropped; it is freed when the
last of them goes, and until then they read the logits the context last held.

Threads. As in C: a Model may be shared by threads; a Context or a Sampler is used by
one thread at a time. ctypes releases the GIL during every call into the library. A
Context's (and a Sampler's) calls hold its lock, so calls from two threads wait for
each other instead of corrupting it, and close() (of it, its Pool or its Model) waits
for a call in flight; Sampler.sample(context) holds the context's lock too, as it
reads its logits in place; a route, abort or log callback must not use the context it
was called from (refused: MoasError(MOAS_ERR_BUSY), as the library refuses it). A
Pool.decode holds the locks of every context it names, and waits for a busy one
holding none of them: a route callback of another thread's pool call may decode one
of those contexts while its own, named there too, stays held. To stop a
long decode from another thread, give the context an abort callback that reads a flag
(a threading.Event) the other thread sets.

Lifetimes. A Model or Pool closes what was made from it before itself; its library
object is freed after theirs even when the garbage collector finalises it first.
Integers are checked against the C type they go to: never wrapped; a float or a bool
where an integer goes is a TypeError.
"""

import contextlib
import ctypes
import enum
import errno
import itertools
import math
import operator
import os
import subprocess
import sys
import threading
import weakref
from collections import namedtuple

__all__ = [
    "MoasError", "MoasValueError", "MoasFileNotFoundError", "Status", "LogLevel", "Type", "Mixing", "KvSharing", "MetaType", "Mode",
    "Kernels", "Logits", "Model", "Context", "Sampler", "TensorInfo", "Routes", "Allocator",
    "LogitBias", "find_stop", "Perplexity", "Generation",
    "load_library", "library", "library_path", "version_number", "version_string",
    "status_string", "status_name", "last_error", "ABI_MAJOR",
]

ABI_MAJOR = 1  # the SONAME major (libmoas.so.1) whose ABI this module declares

# ---- enums (values pinned in moas.h) ------------------------------------------------


class Status(enum.IntEnum):
    OK = 0
    ERR_INVALID_ARG = -1
    ERR_NO_MEMORY = -2
    ERR_IO = -3
    ERR_BAD_FORMAT = -4
    ERR_CORRUPT = -5
    ERR_UNSUPPORTED = -6
    ERR_CONTEXT_FULL = -7
    ERR_UNKNOWN_CHAR = -8
    ERR_BUFFER_TOO_SMALL = -9
    ERR_NOT_FOUND = -10
    ERR_WRONG_TYPE = -11
    ERR_INTERNAL = -12
    ERR_INVALID_UTF8 = -13
    ERR_POOL_FULL = -14
    ERR_BUSY = -15
    ERR_ABORTED = -16


class LogLevel(enum.IntEnum):
    ERROR = 0
    WARN = 1
    INFO = 2
    DEBUG = 3


class Type(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q8_0 = 8
    BF16 = 30


class Mixing(enum.IntEnum):
    SINGLE = 0
    MEAN = 1
    ROUTER = 2


class KvSharing(enum.IntEnum):
    INDEPENDENT = 0
    POOLED = 1


class MetaType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class Mode(enum.IntEnum):
    MIXTURE = 0
    ROUTED = 1


class Kernels(enum.IntEnum):
    AUTO = 0
    REF = 1


class Logits(enum.IntEnum):
    NONE = 0
    LAST = 1
    ALL = 2


_INT_META = {MetaType.UINT8, MetaType.INT8, MetaType.UINT16, MetaType.INT16,
             MetaType.UINT32, MetaType.INT32, MetaType.UINT64, MetaType.INT64}
_FLOAT_META = {MetaType.FLOAT32, MetaType.FLOAT64}

# ---- C types --------------------------------------------------------------------------

c_status = ctypes.c_int   # enums are int-sized in the C ABI
c_enum = ctypes.c_int

LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, c_enum, ctypes.c_char_p)
ROUTE_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                            ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int32)
ABORT_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p)
ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class Allocator(ctypes.Structure):
    """struct moas_allocator. Pass an instance as `allocator=`; the object it is given
    to keeps it (and so its function objects) alive."""
    _fields_ = [("alloc", ALLOC_FN), ("free", FREE_FN), ("user", ctypes.c_void_p)]


class ModelParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("use_mmap", ctypes.c_int32),
                ("log", LOG_FN), ("log_user", ctypes.c_void_p),
                ("allocator", ctypes.POINTER(Allocator))]


class ContextParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("n_ctx", ctypes.c_int32),
                ("n_threads", ctypes.c_int32), ("mode", ctypes.c_int32),
                ("kv_type", ctypes.c_int32), ("kernels", ctypes.c_int32), ("log", LOG_FN), ("log_user", ctypes.c_void_p),
                ("allocator", ctypes.POINTER(Allocator)), ("forced_scheme", ctypes.c_int32),
                ("kv_budget_bytes", ctypes.c_uint64), ("route_fn", ROUTE_FN),
                ("route_user", ctypes.c_void_p), ("pool", ctypes.c_void_p),
                ("n_batch", ctypes.c_int32)]


class PoolParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("capacity_bytes", ctypes.c_uint64),
                ("kv_type", ctypes.c_int32), ("page_heads", ctypes.c_int32),
                ("n_threads", ctypes.c_int32), ("kernels", ctypes.c_int32),
                ("n_batch", ctypes.c_int32), ("log", LOG_FN), ("log_user", ctypes.c_void_p),
                ("allocator", ctypes.POINTER(Allocator)), ("steer_below", ctypes.c_float),
                ("commit", ctypes.c_int32)]


class PoolInfo(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("page_heads", ctypes.c_int32),
                ("page_bytes", ctypes.c_uint64), ("n_pages", ctypes.c_int32),
                ("pages_free", ctypes.c_int32), ("n_contexts", ctypes.c_int32),
                ("bytes_capacity", ctypes.c_uint64), ("bytes_held", ctypes.c_uint64),
                ("bytes_used", ctypes.c_uint64), ("bytes_stored", ctypes.c_uint64),
                ("n_threads", ctypes.c_int32)]


class PoolSeq(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("tokens", ctypes.POINTER(ctypes.c_int32)),
                ("n_tokens", ctypes.c_int32), ("which", ctypes.c_int32),
                ("logits", ctypes.POINTER(ctypes.c_float))]


class LogitBias(ctypes.Structure):
    _fields_ = [("token", ctypes.c_int32), ("bias", ctypes.c_float)]


class SamplerParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("temperature", ctypes.c_float),
                ("top_k", ctypes.c_int32), ("top_p", ctypes.c_float),
                ("seed", ctypes.c_uint64), ("allocator", ctypes.POINTER(Allocator)),
                ("min_p", ctypes.c_float), ("repeat_penalty", ctypes.c_float),
                ("repeat_last_n", ctypes.c_int32), ("n_logit_bias", ctypes.c_int32),
                ("logit_bias", ctypes.POINTER(LogitBias)),
                ("frequency_penalty", ctypes.c_float), ("presence_penalty", ctypes.c_float)]


class TokenizeParams(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("unknown", ctypes.c_int32),
                ("replacement", ctypes.c_int32)]


class TensorInfoC(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("name", ctypes.c_char_p), ("type", c_enum),
                ("n_dims", ctypes.c_int32), ("ne", ctypes.c_int64 * 4),
                ("offset", ctypes.c_uint64), ("n_bytes", ctypes.c_uint64),
                ("data", ctypes.c_void_p)]


_P = ctypes.POINTER
_i32, _i64, _u64, _f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float
_sz, _vp, _cp = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p

# name: (restype, argtypes). Handles are passed as void pointers. This table is the
# whole of moas.h; tests/python/test_binding.py checks it against the header.
_SIGNATURES = {
    "moas_version_number": (_i32, []),
    "moas_version_string": (_cp, []),
    "moas_status_string": (_cp, [c_status]),
    "moas_status_name": (_cp, [c_status]),
    "moas_last_error": (_cp, []),
    "moas_model_params_init_sized": (None, [_vp, ctypes.c_size_t]),
    "moas_model_load": (c_status, [_cp, _P(ModelParams), _P(_vp)]),
    "moas_model_load_memory": (c_status, [_vp, _sz, _P(ModelParams), _P(_vp)]),
    "moas_model_free": (None, [_vp]),
    "moas_model_arch": (_cp, [_vp]),
    "moas_model_name": (_cp, [_vp]),
    "moas_model_n_layer": (_i32, [_vp]),
    "moas_model_n_embd": (_i32, [_vp]),
    "moas_model_n_head": (_i32, [_vp]),
    "moas_model_head_dim": (_i32, [_vp]),
    "moas_model_n_ff": (_i32, [_vp]),
    "moas_model_n_vocab": (_i32, [_vp]),
    "moas_model_n_ctx_train": (_i32, [_vp]),
    "moas_model_n_scheme": (_i32, [_vp]),
    "moas_model_mixing": (c_enum, [_vp]),
    "moas_model_kv_sharing": (c_enum, [_vp]),
    "moas_model_has_bias": (_i32, [_vp]),
    "moas_model_n_params": (_u64, [_vp]),
    "moas_model_scheme_n_kv": (_i32, [_vp, _i32]),
    "moas_model_n_tensors": (_i64, [_vp]),
    "moas_model_tensor": (c_status, [_vp, _i64, _P(TensorInfoC)]),
    "moas_model_tensor_find": (c_status, [_vp, _cp, _P(_i64)]),
    "moas_model_meta_count": (_i64, [_vp]),
    "moas_model_meta_key": (_cp, [_vp, _i64]),
    "moas_model_meta_type": (c_status, [_vp, _cp, _P(c_enum)]),
    "moas_model_meta_int": (c_status, [_vp, _cp, _P(_i64)]),
    "moas_model_meta_float": (c_status, [_vp, _cp, _P(ctypes.c_double)]),
    "moas_model_meta_bool": (c_status, [_vp, _cp, _P(_i32)]),
    "moas_model_meta_string": (c_status, [_vp, _cp, _P(_vp), _P(_sz)]),
    "moas_model_meta_array": (c_status, [_vp, _cp, _P(c_enum), _P(_u64)]),
    "moas_model_meta_array_int": (c_status, [_vp, _cp, _u64, _P(_i64)]),
    "moas_model_meta_array_float": (c_status, [_vp, _cp, _u64, _P(ctypes.c_double)]),
    "moas_model_meta_array_string": (c_status, [_vp, _cp, _u64, _P(_vp), _P(_sz)]),
    "moas_context_params_init_sized": (None, [_vp, ctypes.c_size_t]),
    "moas_context_create": (c_status, [_vp, _P(ContextParams), _P(_vp)]),
    "moas_context_free": (None, [_vp]),
    "moas_context_decode": (c_status, [_vp, _i32, _P(_f32)]),
    "moas_context_decode_batch": (c_status, [_vp, _P(_i32), _i32, _P(_f32), c_enum]),
    "moas_context_logits": (_P(_f32), [_vp]),
    "moas_context_n_past": (_i32, [_vp]),
    "moas_context_n_ctx": (_i32, [_vp]),
    "moas_context_mode": (c_enum, [_vp]),
    "moas_context_model": (_vp, [_vp]),
    "moas_context_kernels_name": (_cp, [_vp]),
    "moas_context_reset": (None, [_vp]),
    "moas_context_truncate": (c_status, [_vp, _i32]),
    "moas_context_routes": (c_status, [_vp, _i32, _i32, _P(_f32), _P(_i32), _P(_i32)]),
    "moas_context_scheme_counts": (c_status, [_vp, _i32, _P(_i32)]),
    "moas_context_force_scheme": (c_status, [_vp, _i32]),
    "moas_context_set_kv_budget": (c_status, [_vp, _u64]),
    "moas_context_set_route_callback": (None, [_vp, ROUTE_FN, _vp]),
    "moas_context_set_abort_callback": (None, [_vp, ABORT_FN, _vp]),
    "moas_context_kv_bytes_used": (_sz, [_vp, _i32]),
    "moas_context_kv_bytes_reserved": (_sz, [_vp, _i32]),
    "moas_pool_params_init_sized": (None, [_vp, ctypes.c_size_t]),
    "moas_pool_create": (c_status, [_vp, _P(PoolParams), _P(_vp)]),
    "moas_pool_free": (None, [_vp]),
    "moas_pool_stats": (c_status, [_vp, _P(PoolInfo)]),
    "moas_pool_decode": (c_status, [_vp, _P(PoolSeq), _i32]),
    "moas_context_fork": (c_status, [_vp, _P(_vp)]),
    "moas_context_compact": (c_status, [_vp, _i32, _i32, _P(_i32)]),
    "moas_context_shift": (c_status, [_vp, _i32, _i32]),
    "moas_context_kv_pages": (_i32, [_vp]),
    "moas_context_kv_bytes_held": (_sz, [_vp]),
    "moas_context_state_size": (_sz, [_vp]),
    "moas_context_state_save": (c_status, [_vp, _vp, _sz, _P(_sz)]),
    "moas_context_state_load": (c_status, [_vp, _vp, _sz]),
    "moas_context_kv_token_bytes": (_u64, [_vp, _i32]),
    "moas_context_n_threads": (_i32, [_vp]),
    "moas_tokenize": (c_status, [_vp, _cp, _sz, _P(_i32), _sz, _P(_sz)]),
    "moas_tokenize_params_init_sized": (None, [_vp, ctypes.c_size_t]),
    "moas_tokenize_ex": (c_status, [_vp, _cp, _sz, _P(TokenizeParams), _P(_i32), _sz, _P(_sz),
                                    _P(_sz)]),
    "moas_detokenize": (c_status, [_vp, _P(_i32), _sz, _cp, _sz, _P(_sz)]),
    "moas_token_text": (_cp, [_vp, _i32]),
    "moas_sampler_params_init_sized": (None, [_vp, ctypes.c_size_t]),
    "moas_sampler_create": (c_status, [_P(SamplerParams), _i32, _P(_vp)]),
    "moas_sampler_free": (None, [_vp]),
    "moas_sampler_sample": (c_status, [_vp, _P(_f32), _P(_i32)]),
    "moas_sampler_reseed": (None, [_vp, _u64]),
    "moas_sampler_accept": (c_status, [_vp, _i32]),
    "moas_sampler_reset": (None, [_vp]),
    "moas_text_find_stop": (c_status, [_cp, _sz, _P(_cp), _sz, _i32, _P(_sz), _P(_i32)]),
}

# ---- finding and loading the library ------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.platform == "darwin":
    _SONAME = "libmoas.%d.dylib" % ABI_MAJOR
else:
    _SONAME = "libmoas.so.%d" % ABI_MAJOR

_lib = None
_lib_path = None


def _candidates():
    """Paths to try, in the documented order (MOAS_LIBRARY alone when it is set)."""
    env = os.environ.get("MOAS_LIBRARY")
    if env:
        return [env]
    found = []
    try:
        out = subprocess.run(["pkg-config", "--variable=libdir", "moas"], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True).stdout.strip()
        if out:
            found.append(os.path.join(out, _SONAME))
    except (OSError, subprocess.CalledProcessError):
        pass
    found.append(os.path.join(_HERE, os.pardir, os.pardir, os.pardir, "lib", _SONAME))
    return found


def load_library(path=None):
    """Load libmoas from `path`, or from the first candidate that exists, and declare
    every function. Returns the ctypes.CDLL. Raises OSError if none loads."""
    global _lib, _lib_path
    paths = [path] if path else _candidates()
    errors = []
    for p in paths:
        if not os.path.exists(p):
            errors.append("%s: no such file" % p)
            continue
        try:
            lib = ctypes.CDLL(os.path.abspath(p))
        except OSError as e:
            errors.append("%s: %s" % (p, e))
            continue
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        major = lib.moas_version_number() // 10000
        if major != ABI_MAJOR:
            errors.append("%s: version %s, this module needs %d.x"
                          % (p, lib.moas_version_string().decode(), ABI_MAJOR))
            continue
        _check_struct_sizes(lib)
        _lib, _lib_path = lib, os.path.abspath(p)
        return lib
    raise OSError("libmoas not found (set MOAS_LIBRARY, install it with pkg-config, or run "
                  "make in the source tree):\n  " + "\n  ".join(errors))


def library():
    """The loaded ctypes.CDLL, loading it first if needed."""
    return _lib if _lib is not None else load_library()


def library_path():
    """The absolute path of the loaded library (loading it first if needed)."""
    library()
    return _lib_path


def _library_sizeof(init):
    """sizeof() of a params struct as the library knows it: given more room than it
    needs, _params_init_sized fills its own size and says so in the `size` field."""
    buf = ctypes.create_string_buffer(4096)
    init(buf, len(buf))
    return ctypes.c_uint32.from_buffer(buf).value


def _check_struct_sizes(lib):
    for init, cls in ((lib.moas_model_params_init_sized, ModelParams),
                      (lib.moas_context_params_init_sized, ContextParams),
                      (lib.moas_sampler_params_init_sized, SamplerParams),
                      (lib.moas_pool_params_init_sized, PoolParams),
                      (lib.moas_tokenize_params_init_sized, TokenizeParams)):
        if _library_sizeof(init) < ctypes.sizeof(cls):
            raise OSError("libmoas: %s is larger here than in the library" % cls.__name__)


def _params(init, cls):
    """The library's defaults in our declaration of the struct: _params_init_sized
    fills our sizeof bytes and sets `size` to what it filled (moas.h, STABILITY)."""
    params = cls()
    init(ctypes.byref(params), ctypes.sizeof(cls))
    return params


# ---- errors ---------------------------------------------------------------------------


class MoasError(Exception):
    """A libmoas call failed. `status` (Status or int), `name` ("MOAS_ERR_..."),
    `status_string` (the fixed sentence) and `message` (moas_last_error()).

    Wrong arguments and bad input (statuses in _VALUE_STATUSES) come as
    MoasValueError, also a ValueError; a model file that does not exist as
    MoasFileNotFoundError, also a FileNotFoundError. `except MoasError` catches all."""

    def __new__(cls, status=0, message="", *args):
        if cls is MoasError and status in _VALUE_STATUSES:
            cls = MoasValueError
        return super().__new__(cls, status, message, *args)

    def __init__(self, status, message=""):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.name = status_name(status)
        self.status_string = status_string(status)
        self.message = message
        super().__init__(status, message)

    def __str__(self):
        # MOAS_ERR_CORRUPT's sentence ("truncated or inconsistent") would blame
        # truncation for a whole file whose parts disagree, and BAD_FORMAT's speaks of
        # GGUF files where a saved state was refused; the message says which.
        if self.status in (Status.ERR_CORRUPT, Status.ERR_BAD_FORMAT) and self.message:
            return "%s: %s" % (self.name, self.message)
        return "%s (%s): %s" % (self.name, self.status_string, self.message)


class MoasValueError(MoasError, ValueError):
    """A MoasError for a wrong argument or bad input; also a ValueError."""


class MoasFileNotFoundError(MoasError, FileNotFoundError):
    """A MoasError for a model path that does not exist; also a FileNotFoundError, with
    errno ENOENT and the path as filename, as open() would give."""

    def __init__(self, status, message="", filename=None):
        super().__init__(status, message)
        self.errno, self.strerror, self.filename = errno.ENOENT, message, filename


_VALUE_STATUSES = {Status.ERR_INVALID_ARG, Status.ERR_BAD_FORMAT, Status.ERR_CORRUPT,
                   Status.ERR_UNSUPPORTED, Status.ERR_UNKNOWN_CHAR, Status.ERR_NOT_FOUND,
                   Status.ERR_WRONG_TYPE, Status.ERR_INVALID_UTF8, Status.ERR_CONTEXT_FULL}


def _check(status):
    """Raise MoasError for a failed status, with this thread's moas_last_error()."""
    if status != Status.OK:
        raise MoasError(status, last_error())


def _closed(what):
    return MoasError(Status.ERR_INVALID_ARG, "%s is closed" % what)


# ctypes stores an int modulo 2^n: 2**32 + 5 would be token 5. Every int an argument or
# a field takes is checked against its C type first.
_INT_RANGES = {ctypes.c_int32: (-2**31, 2**31), ctypes.c_int64: (-2**63, 2**63),
               ctypes.c_uint64: (0, 2**64), ctypes.c_uint32: (0, 2**32)}
_INT_RANGES[ctypes.c_size_t] = (0, 2**(8 * ctypes.sizeof(ctypes.c_size_t)))


def _index(what, value):
    """`value` as a Python int: an int or what stands for one (a numpy integer), else
    TypeError; a float is not silently truncated, and a bool is no count or id."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError("%s must be an integer, not %s" % (what, type(value).__name__))


def _stop_list(stop):
    """Stop strings as a list: None is none, one string (or bytes) is one."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, (str, bytes)) else list(stop)


def _int(what, value, ctype=ctypes.c_int32):
    """`value` as an int that `ctype` holds exactly: TypeError for a non-integer
    (_index), MoasValueError outside the type's range."""
    if isinstance(value, ctypes._SimpleCData):
        return value
    v = _index(what, value)
    lo, hi = _INT_RANGES[ctype]
    if not lo <= v < hi:
        raise MoasError(Status.ERR_INVALID_ARG, "%s %d is outside [%d, %d]"
                        % (what, v, lo, hi - 1))
    return v


def _real(what, value):
    """`value` as the float a float field takes: TypeError naming `what` for what is no
    real number (ctypes said only "must be real number, not str") and for a bool
    (temperature=True was 1.0)."""
    if isinstance(value, (bool, str, bytes, complex)) or not hasattr(value, "__float__"):
        raise TypeError("%s must be a real number, not %s" % (what, type(value).__name__))
    try:
        return float(value)
    except OverflowError:   # an int beyond any float: infinite, which the library refuses
        return math.inf if value > 0 else -math.inf


def _key(key):
    """A metadata key or tensor name as the C string the library reads: TypeError for a
    non-str, MoasValueError for an embedded NUL (C would read only up to it)."""
    if not isinstance(key, str):
        raise TypeError("a key or name is a str, not %s" % type(key).__name__)
    if "\0" in key:
        raise MoasError(Status.ERR_INVALID_ARG, "%r contains NUL" % (key,))
    return key.encode("utf-8", "surrogateescape")


def _ids(tokens, what="token"):
    """A c_int32 array of `tokens` (any iterable of ints), each checked."""
    if isinstance(tokens, (str, bytes, bytearray)):
        raise TypeError("tokens are a sequence of token ids, not %s (tokenize text first)"
                        % type(tokens).__name__)
    tokens = [_int(what, t) for t in tokens]
    ids = _array(ctypes.c_int32, len(tokens))
    ids[:len(tokens)] = tokens
    return ids, len(tokens)


def version_number():
    return library().moas_version_number()


def version_string():
    return library().moas_version_string().decode()


def _status(status):
    """`status` as the int moas_status holds: ctypes would wrap one beyond int32 into
    the table (2**32 - 1 named MOAS_ERR_INVALID_ARG); it stands for a value that no
    status has, as it has none either."""
    v = _index("status", status)
    return v if -2**31 <= v < 2**31 else -2**31


def status_string(status):
    return library().moas_status_string(_status(status)).decode()


def status_name(status):
    """"MOAS_ERR_CORRUPT" and the like; "MOAS_UNKNOWN" for a value outside the table."""
    return library().moas_status_name(_status(status)).decode()


def last_error():
    return library().moas_last_error().decode("utf-8", "replace")


def _callback(what, fn):
    """`fn` when it is None or callable, else TypeError now: a route or abort callback
    failed every decode later, and a log callback was never heard."""
    if fn is not None and not callable(fn):
        raise TypeError("%s must be callable or None, not %s" % (what, type(fn).__name__))
    return fn


def _allocator(allocator):
    """A pointer to `allocator` (an Allocator) for a params struct, or NULL for None;
    TypeError for anything else (ctypes said "_type_ must have storage info")."""
    if allocator is None:
        return ctypes.POINTER(Allocator)()
    if not isinstance(allocator, Allocator):
        raise TypeError("allocator must be a moas.Allocator, not %s"
                        % type(allocator).__name__)
    return ctypes.pointer(allocator)


def _log_callback(fn):
    """A ctypes log callback calling fn(level, message), or a NULL one."""
    if _callback("log", fn) is None:
        return LOG_FN()

    def log(_user, level, message):
        try:
            fn(LogLevel(level), message.decode("utf-8", "replace"))
        except Exception:  # an exception cannot cross the C frames
            pass
    return LOG_FN(log)


def _utf8(text):
    if isinstance(text, str):
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:   # a lone surrogate no bytes stand for
            raise MoasError(Status.ERR_INVALID_UTF8, "text has a lone surrogate U+%04X at "
                            "index %d, which UTF-8 cannot encode"
                            % (ord(text[e.start]), e.start)) from None
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError("text must be str or bytes, not %s" % type(text).__name__)


_ARRAY_TYPES = {}


def _array_type(ctype, n, exact=False):
    """`ctype` * max(n, 1), or with the length rounded up to a power of two unless
    `exact`, from a cache, so that a process makes few array types: ctypes keeps one
    only while an array of it lives, and a type is a reference cycle that only the
    cyclic collector frees, so a type made per call (per decode step in a server)
    leaves garbage behind every call."""
    size = max(n, 1)
    if not exact:
        size = 1 << (size - 1).bit_length()
    key = (ctype, size)
    t = _ARRAY_TYPES.get(key)
    if t is None:
        t = _ARRAY_TYPES[key] = ctype * size
    return t


def _array(ctype, n, exact=False):
    """A zeroed array of _array_type(ctype, n, exact)."""
    return _array_type(ctype, n, exact)()


def _floats(buf, n):
    """The first n floats of a ctypes float array, as a memoryview."""
    return memoryview(buf).cast("B")[:4 * n].cast("f")


def _exact(ctype, n):
    """A zeroed bytearray of exactly max(n, 1) `ctype` for the caller to keep, and what
    passes it to the library: a one-element array at its start (of one cached type,
    whatever n)."""
    buf = bytearray(ctypes.sizeof(ctype) * max(n, 1))
    return buf, _array_type(ctype, 1).from_buffer(buf)


def _float_rows(n):
    """_exact(c_float, n), the bytearray viewed as floats."""
    buf, arg = _exact(ctypes.c_float, n)
    return memoryview(buf).cast("f"), arg


def _enum(cls, value):
    """An enum member from its name (any case) or value; MoasValueError otherwise, and
    TypeError for a bool or a float, which an enum takes as the int they equal
    (mode=True was routed mode, kv_type=8.0 q8_0)."""
    try:
        member = cls[value.upper()] if isinstance(value, str) else cls(value)
    except (KeyError, ValueError, TypeError):
        raise MoasError(Status.ERR_INVALID_ARG, "%s must be one of %s, got %r" % (
            cls.__name__.lower(), ", ".join(m.name.lower() for m in cls), value)) from None
    if not isinstance(value, str):
        _index(cls.__name__.lower(), value)
    return member


def _text(ptr, length=None):
    if ptr is None:
        return None
    raw = ctypes.string_at(ptr, length) if length is not None else ptr
    return raw.decode("utf-8", "surrogateescape")


# ---- model ----------------------------------------------------------------------------

TensorInfo = namedtuple("TensorInfo", "index name type shape offset n_bytes data")
TensorInfo.__doc__ = """One tensor of the file. `shape` is GGUF order (fastest first);
`data` is a read-only memoryview of its n_bytes bytes over the model's memory (no copy):
Model.close() releases it, and a slice or cast of it keeps that memory (the library's
model) until it goes."""


# Guards every handle's count of live dependents and its held pointer: contexts are
# freed, and views of a model's memory collected, on any thread. Reentrant, as the
# collector may run a view's finaliser inside a section that holds it.
_LIVE = threading.RLock()


class _Handle:
    """A library object owned by Python: released by close(), a `with` block, or the
    garbage collector. Calls on a closed handle raise MoasError.

    Objects that others need (a Model its Pools and Contexts, a Pool its Contexts) keep
    their dependents in `_dependents` and count the live ones in `_n_live`; close()
    closes the dependents first. The garbage collector may finalise an object before
    the dependents of a reference cycle it is part of (their weak references are gone
    by then), so the library object is freed only when the last of them has been:
    the C rule "free the contexts before the pool" holds whatever order Python picks."""

    _kind = "object"
    _ptr = None
    _held = None      # a closed object's pointer, freed with its last dependent
    _n_live = 0       # dependents whose library objects are not freed yet
    _owners = ()      # the Model (and Pool) this one depends on

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_ptr", None) is not None and _lib is not None:
            self.close()

    @property
    def closed(self):
        return self._ptr is None

    def _p(self):
        if self._ptr is None:
            raise _closed(self._kind)
        return self._ptr

    def _depend_on(self, owner):
        """This object's library object needs owner's until it is freed."""
        with _LIVE:
            owner._dependents.add(self)
            owner._n_live += 1
        self._owners += (owner,)

    def _freed(self):
        """After this object's library object is freed: its owners may go now."""
        for owner in self._owners:
            owner._dependent_gone()
        self._owners = ()

    def _dependent_gone(self):
        """One dependent's library object (or a view of the model's memory) is gone:
        a closed owner whose last one it was is freed now."""
        with _LIVE:
            self._n_live -= 1
            held = None
            if self._n_live == 0 and self._held is not None:
                held, self._held = self._held, None
        if held is not None:
            self._free(held)

    def _held_by(self, array):
        """`array`, a ctypes array made with from_address over this object's library
        memory, counts as a dependent until it is collected. Every memoryview made
        from it (and every slice, cast, memoryview or numpy array of those) references
        it, whether or not the view handed out was released, so once closed the
        library object is freed only when the last of them is gone. Not at
        interpreter exit: objects that still reach the memory then (a daemon thread's,
        a module global read by a __del__) must not find it freed."""
        with _LIVE:
            self._n_live += 1
        weakref.finalize(array, self._dependent_gone).atexit = False

    def _close_owner(self):
        """close() of a Model or Pool: its dependents first, then itself, unless some
        are still alive (a cycle being collected): then with the last of them."""
        for dep in list(self._dependents):
            dep.close()
        self._release()

    def _release(self):
        """Closed: the library object is freed now, or, while dependents still need
        it, with the last of them (_dependent_gone)."""
        with _LIVE:
            ptr = None
            if self._ptr is not None:
                ptr, self._ptr = self._ptr, None
                if self._n_live > 0:
                    self._held, ptr = ptr, None
        if ptr is not None:
            self._free(ptr)

    @contextlib.contextmanager
    def _use(self):
        """A call on a Model or Pool, from any thread: close() waits until it ends
        (_stop_calls). Their objects set up _users, _users_cond and _closing."""
        me = threading.get_ident()
        with self._users_cond:
            if self._closing or self._ptr is None:
                raise _closed(self._kind)
            self._users[me] = self._users.get(me, 0) + 1
        try:
            yield self._ptr
        finally:
            with self._users_cond:
                self._users[me] -= 1
                if self._users[me] == 0:
                    del self._users[me]
                    self._users_cond.notify_all()

    def _stop_calls(self):
        """close() of a Model or Pool: refuse new calls, wait for those under way; one
        of this thread's own (a callback closing what called it) is refused."""
        me = threading.get_ident()
        with self._users_cond:
            # checked before anything closes: refused half-way, the dependents closed
            # before the one inside the call stayed closed, and this object refused
            # every call while `closed` said it was open
            if self._users.get(me) or any(dep._inside_call(me)
                                          for dep in list(self._dependents)):
                raise MoasError(Status.ERR_BUSY, "close: a callback must not close "
                                "the %s it was called from" % self._kind)
            self._closing = True   # new calls are refused; those under way finish
            self._users_cond.wait_for(lambda: not self._users)

    def _inside_call(self, me):
        """Whether thread `me` is inside a call on this object (in one of its
        callbacks)."""
        return bool(getattr(self, "_users", {}).get(me))

    def _call(self, name, *args):
        fn = getattr(library(), name)
        for i, (arg, ctype) in enumerate(zip(args, fn.argtypes[1:])):
            if ctype in _INT_RANGES and not isinstance(arg, ctypes._SimpleCData):
                _int("%s: argument %d" % (name[5:], i + 1), arg, ctype)
        return fn(self._p(), *args)


class Generation:
    """The pieces of Model.generate(..., stream=True), as they are made. Once the last
    has come out, finish_reason says why the text ended, as OpenAI's completions (and
    llama-cpp-python's) say it: "stop" (a stop string; the text ends before it) or
    "length" (max_tokens characters, or a full context without context_shift); None
    until then. close() ends it early, giving its context back at once."""

    def __init__(self, pieces, owned=()):
        self._pieces = pieces
        self._owned = owned   # what the pieces' generator closes when it ends
        self.finish_reason = None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._pieces)
        except StopIteration as end:
            self.finish_reason = end.value
            raise

    def close(self):
        self._pieces.close()
        for obj in self._owned:   # a generator never started has not entered its `with`
            obj.close()


class Model(_Handle):
    """A loaded GGUF model (moas_model). Read-only; may be shared by threads."""

    _kind = "model"

    def __init__(self, path, *, use_mmap=True, log=None, allocator=None):
        self._ptr = None
        self._dependents = weakref.WeakSet()
        self._views = weakref.WeakValueDictionary()   # tensor data views, by id: close()
        # releases them (memoryviews hash by content, so no WeakSet)
        self._users, self._users_cond, self._closing = {}, threading.Condition(), False
        self._buffer = None
        params = self._make_params(log, allocator)
        params.use_mmap = 1 if use_mmap else 0
        out = ctypes.c_void_p()
        encoded = os.fsencode(path)
        if b"\0" in encoded:
            raise ValueError("embedded null byte in the model path")
        status = library().moas_model_load(encoded, ctypes.byref(params),
                                           ctypes.byref(out))
        if status == Status.ERR_IO and not os.path.exists(path):
            raise MoasFileNotFoundError(status, last_error(), path)
        _check(status)
        self._ptr = out.value

    @classmethod
    def from_bytes(cls, data, *, log=None, allocator=None):
        """Load a model held in memory: bytes, bytearray, memoryview, mmap, ... The
        buffer is borrowed (moas_model_load_memory), so the model keeps it alive; a
        writable one must not be changed while the model is open."""
        self = cls.__new__(cls)
        self._ptr = None
        self._dependents = weakref.WeakSet()
        self._views = weakref.WeakValueDictionary()
        self._users, self._users_cond, self._closing = {}, threading.Condition(), False
        params = self._make_params(log, allocator)
        # ctypes.cast() would tie these objects into a reference cycle, and so keep a
        # bytearray exported after close(): pass the objects themselves as void *.
        if isinstance(data, bytes):
            keep = data
            size = len(data)
        else:
            view = memoryview(data).cast("B")
            if view.readonly:
                keep = view.tobytes()   # ctypes cannot address a read-only buffer
            else:
                keep = (ctypes.c_char * view.nbytes).from_buffer(view)
            size = view.nbytes
        self._buffer = keep
        out = ctypes.c_void_p()
        _check(library().moas_model_load_memory(keep, size, ctypes.byref(params),
                                                ctypes.byref(out)))
        self._ptr = out.value
        return self

    def _make_params(self, log, allocator):
        params = _params(library().moas_model_params_init_sized, ModelParams)
        self._log = _log_callback(log)
        params.log = self._log
        self._allocator = allocator
        params.allocator = _allocator(allocator)
        return params

    # lifetime
    def close(self):
        """Free the model, after the contexts and pools made from it, and after the
        calls other threads are making on it end. Idempotent. Tensor views it handed
        out are released; slices and casts of them keep the model's memory until they
        go (the library object is freed with the last of them)."""
        self._stop_calls()
        for view in list(self._views.values()):
            try:
                view.release()
            except BufferError:   # something still exports it (a cast, numpy)
                pass
        self._views.clear()
        self._close_owner()

    def _free(self, ptr):
        library().moas_model_free(ptr)
        self._buffer = None

    def _call(self, name, *args):
        with self._use():
            return _Handle._call(self, name, *args)


    # hyperparameters
    arch = property(lambda self: self._call("moas_model_arch").decode())
    @property
    def name(self):
        with self._use():   # the text is the model's: read before close() may free it
            return _text(self._call("moas_model_name"))
    n_layer = property(lambda self: self._call("moas_model_n_layer"))
    n_embd = property(lambda self: self._call("moas_model_n_embd"))
    n_head = property(lambda self: self._call("moas_model_n_head"))
    head_dim = property(lambda self: self._call("moas_model_head_dim"))
    n_ff = property(lambda self: self._call("moas_model_n_ff"))
    n_vocab = property(lambda self: self._call("moas_model_n_vocab"))
    n_ctx_train = property(lambda self: self._call("moas_model_n_ctx_train"))
    n_scheme = property(lambda self: self._call("moas_model_n_scheme"))
    mixing = property(lambda self: Mixing(self._call("moas_model_mixing")))
    kv_sharing = property(lambda self: KvSharing(self._call("moas_model_kv_sharing")))
    has_bias = property(lambda self: bool(self._call("moas_model_has_bias")))
    n_params = property(lambda self: self._call("moas_model_n_params"))

    def scheme_n_kv(self, scheme):
        """KV heads stored per token by `scheme`; MoasError if out of range."""
        n = self._call("moas_model_scheme_n_kv", scheme)
        if n == 0:
            raise MoasError(Status.ERR_INVALID_ARG,
                            "scheme %d outside [0, %d)" % (scheme, self.n_scheme))
        return n

    @property
    def schemes(self):
        """KV heads of every scheme, e.g. [6, 2, 1] (MHA, GQA, MQA)."""
        return [self.scheme_n_kv(s) for s in range(self.n_scheme)]

    # tensors
    @property
    def n_tensors(self):
        return self._call("moas_model_n_tensors")

    def tensor_find(self, name):
        index = ctypes.c_int64()
        _check(self._call("moas_model_tensor_find", _key(name), ctypes.byref(index)))
        return index.value

    def tensor(self, key):
        """The TensorInfo of tensor number `key`, or of the tensor called `key`."""
        with self._use():   # the name and data are the model's: read before close()
            index = self.tensor_find(key) if isinstance(key, str) else key
            info = TensorInfoC()
            info.size = ctypes.sizeof(TensorInfoC)
            _check(self._call("moas_model_tensor", index, ctypes.byref(info)))
            data = None
            if info.data and info.n_bytes:
                # slices and casts of the view reach the memory without it (releasing
                # the view does not release them), but each keeps the array alive:
                # the model's library object counts it as a dependent
                array = (ctypes.c_char * info.n_bytes).from_address(info.data)
                self._held_by(array)
                raw = memoryview(array)
                data = raw.cast("B").toreadonly()
                raw.release()
                self._views[id(data)] = data   # released by close()
            try:
                ttype = Type(info.type)
            except ValueError:
                ttype = info.type
            return TensorInfo(index, info.name.decode(), ttype,
                              tuple(info.ne[:info.n_dims]), info.offset, info.n_bytes, data)

    def tensors(self):
        return [self.tensor(i) for i in range(self.n_tensors)]

    # metadata
    @property
    def meta_count(self):
        return self._call("moas_model_meta_count")

    def meta_key(self, index):
        key = self._call("moas_model_meta_key", index)
        if key is None:
            raise MoasError(Status.ERR_INVALID_ARG,
                            "metadata index %d outside [0, %d)" % (index, self.meta_count))
        # a file's key need not be UTF-8: its bytes as surrogate escapes, which _key
        # turns back into them (a strict decode raised UnicodeDecodeError)
        return key.decode("utf-8", "surrogateescape")

    def meta_keys(self):
        return [self.meta_key(i) for i in range(self.meta_count)]

    def meta_type(self, key):
        t = ctypes.c_int()
        _check(self._call("moas_model_meta_type", _key(key), ctypes.byref(t)))
        return MetaType(t.value)

    def meta_int(self, key):
        v = ctypes.c_int64()
        _check(self._call("moas_model_meta_int", _key(key), ctypes.byref(v)))
        return v.value

    def meta_float(self, key):
        v = ctypes.c_double()
        _check(self._call("moas_model_meta_float", _key(key), ctypes.byref(v)))
        return v.value

    def meta_bool(self, key):
        v = ctypes.c_int32()
        _check(self._call("moas_model_meta_bool", _key(key), ctypes.byref(v)))
        return bool(v.value)

    def meta_string(self, key):
        """A string value as str (undecodable bytes as surrogate escapes)."""
        p, n = ctypes.c_void_p(), ctypes.c_size_t()
        with self._use():   # the text is the model's: read before close() may free it
            _check(self._call("moas_model_meta_string", _key(key), ctypes.byref(p),
                              ctypes.byref(n)))
            return _text(p.value, n.value)

    def meta_array(self, key):
        """(element MetaType, length) of an array value."""
        t, n = ctypes.c_int(), ctypes.c_uint64()
        _check(self._call("moas_model_meta_array", _key(key), ctypes.byref(t),
                          ctypes.byref(n)))
        return MetaType(t.value), n.value

    def meta_array_int(self, key, index):
        v = ctypes.c_int64()
        _check(self._call("moas_model_meta_array_int", _key(key), index, ctypes.byref(v)))
        return v.value

    def meta_array_float(self, key, index):
        v = ctypes.c_double()
        _check(self._call("moas_model_meta_array_float", _key(key), index, ctypes.byref(v)))
        return v.value

    def meta_array_string(self, key, index):
        p, n = ctypes.c_void_p(), ctypes.c_size_t()
        with self._use():
            _check(self._call("moas_model_meta_array_string", _key(key), index,
                              ctypes.byref(p), ctypes.byref(n)))
            return _text(p.value, n.value)

    def meta(self, key):
        """The value under `key` as a Python value of its type; arrays as lists."""
        t = self.meta_type(key)
        if t == MetaType.ARRAY:
            elem, n = self.meta_array(key)
            get = (self.meta_array_string if elem == MetaType.STRING else
                   self.meta_array_float if elem in _FLOAT_META else self.meta_array_int)
            values = [get(key, i) for i in range(n)]
            return [bool(v) for v in values] if elem == MetaType.BOOL else values
        if t == MetaType.STRING:
            return self.meta_string(key)
        if t == MetaType.BOOL:
            return self.meta_bool(key)
        if t in _FLOAT_META:
            return self.meta_float(key)
        return self.meta_int(key)

    def metadata(self):
        """Every key and its value, in file order."""
        return {k: self.meta(k) for k in self.meta_keys()}

    # tokenizer
    def tokenize(self, text, unknown="error", replacement=" "):
        """Token ids of `text` (str or UTF-8 bytes), one per character.

        `unknown` says what to do with a character outside the vocabulary: "error"
        (MoasError ERR_UNKNOWN_CHAR), "replace" (by the character `replacement`) or
        "drop". Invalid UTF-8 is ERR_INVALID_UTF8 whatever the rule. tokenize_ex()
        also says how many characters were changed."""
        # moas_tokenize (1.0) calls invalid UTF-8 an unknown character
        return self.tokenize_ex(text, unknown, replacement)[0]

    def tokenize_ex(self, text, unknown="error", replacement=" "):
        """(ids, n_changed): moas_tokenize_ex with the rule `unknown` ("error",
        "replace" by the character `replacement`, or "drop"); n_changed counts the
        characters replaced or dropped."""
        rules = {"error": 0, "replace": 1, "drop": 2}
        if unknown not in rules:
            raise MoasError(Status.ERR_INVALID_ARG, "unknown must be one of %s, got %r"
                            % (", ".join(rules), unknown))
        params = _params(library().moas_tokenize_params_init_sized, TokenizeParams)
        params.unknown = rules[unknown]
        if unknown == "replace":
            ids = self.tokenize(replacement)
            if len(ids) != 1:
                raise MoasError(Status.ERR_INVALID_ARG, "the replacement must be one "
                                "character, got %r" % (replacement,))
            params.replacement = ids[0]
        raw = _utf8(text)
        cap = max(len(raw), 1)   # one id per character, so at most one per byte
        ids, n, changed = _array(ctypes.c_int32, cap), ctypes.c_size_t(), ctypes.c_size_t()
        _check(self._call("moas_tokenize_ex", raw, len(raw), ctypes.byref(params), ids, cap,
                          ctypes.byref(n), ctypes.byref(changed)))
        return ids[:n.value], changed.value

    def detokenize(self, tokens):
        ids, n_tokens = _ids(tokens)
        cap = 4 * n_tokens + 1   # a character is at most 4 UTF-8 bytes
        buf, n = _array(ctypes.c_char, cap), ctypes.c_size_t()
        _check(self._call("moas_detokenize", ids, n_tokens, buf, cap, ctypes.byref(n)))
        return buf.raw[:n.value].decode("utf-8", "surrogateescape")

    def token_text(self, token):
        text = self._call("moas_token_text", token)
        if text is None:
            raise MoasError(Status.ERR_INVALID_ARG,
                            "token %d outside [0, %d)" % (token, self.n_vocab))
        if not text:   # the NUL character, whose C string reads as empty (moas.h)
            return self.detokenize([token])
        return text.decode("utf-8", "surrogateescape")

    @property
    def vocab(self):
        return [self.token_text(i) for i in range(self.n_vocab)]

    def context(self, **params):
        """A new Context for this model; see Context for the parameters."""
        return Context(self, **params)

    # high level: text in, text out (the ctypes layer above is what they use)
    def generate(self, prompt, max_tokens=128, *, temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, logit_bias=None, seed=0,
                 frequency_penalty=0.0, presence_penalty=0.0,
                 stop=(), stream=False, routes=False, mode="mixture", n_ctx=0,
                 unknown="error", n_threads=0, forced_scheme=-1, kv_type="f32",
                 context_shift=False):
        """The continuation of `prompt`, sampled as Sampler samples (with its defaults,
        the library's: temperature 1, as `moas generate`).

        stream=False returns the text; stream=True returns a Generation, an iterator of
        text pieces (one per character, fewer while a possible stop string is held
        back) whose finish_reason, once they are all out, says why they ended. With
        routes=True each piece comes as (text, route), route being {"schemes": [scheme
        per layer], "gates": [[gate per scheme] per layer]} of the generated character
        that produced it, and stream=False returns (text, [route, ...]).

        Generation ends after max_tokens characters, before the first of the `stop`
        strings, or when the context (n_ctx, 0: the trained length) is full; with
        context_shift=True it goes on past a full context as `moas generate` does: a
        RoPE model's cache is shifted (its first 4 tokens stay, half of the rest is
        dropped, the later half moves down without being decoded again), a model of
        learned positions is decoded again from its last n_ctx / 2 tokens. A prompt
        that does not fit raises MoasValueError, as do wrong arguments; `unknown`
        ("error", "replace", "drop") is Model.tokenize's rule for characters outside
        the vocabulary; forced_scheme, mode, kv_type and n_ctx are Context's."""
        stop = _stop_list(stop)
        for one in stop:   # wrong ones raise here, not at the first piece of a stream
            _stop_bytes(one)
        max_tokens = _int("max_tokens", max_tokens)
        if max_tokens < 0:
            raise MoasError(Status.ERR_INVALID_ARG, "max_tokens must be >= 0, got %d"
                            % max_tokens)
        ids = self.tokenize(prompt, unknown=unknown)
        if not ids:
            raise MoasError(Status.ERR_INVALID_ARG, "the prompt is empty")
        ctx = Context(self, n_ctx=n_ctx, mode=mode, n_threads=n_threads,
                      forced_scheme=forced_scheme, kv_type=kv_type)
        if len(ids) > ctx.n_ctx:
            n = ctx.n_ctx
            ctx.close()
            raise MoasError(Status.ERR_INVALID_ARG, "the prompt is %d characters, the "
                            "context holds %d" % (len(ids), n))
        try:
            sampler = Sampler(self, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, min_p=min_p, repeat_penalty=repeat_penalty,
                              repeat_last_n=repeat_last_n, logit_bias=logit_bias,
                              frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty)
        except BaseException:
            ctx.close()
            raise
        pieces = Generation(self._generate(ctx, sampler, ids, max_tokens, stop, routes,
                                           bool(context_shift)), owned=(ctx, sampler))
        if stream:
            return pieces
        out = list(pieces)
        text = "".join(p[0] if routes else p for p in out)
        return (text, [p[1] for p in out]) if routes else text

    def chat(self, messages, max_tokens=None, *, stop=(), **params):
        """The answer to a conversation, as the server's /v1/chat/completions gives it.

        `messages` are OpenAI's: a list of {"role", "content"}, the role system,
        developer, user or assistant, the content a string or a list of text parts
        {"type": "text", "text": ...}. moas.chat.ChatTemplate writes them into one
        prompt ("user: ...\n" each, then "assistant: "), which Model.generate
        continues until the model begins the next turn (a newline and a role's label,
        the template's stop strings, added to `stop`), one of `stop`, max_tokens
        characters (None: the rest of the context; a conversation that fills it raises
        MoasValueError) or a full context. Keyword arguments are Model.generate's
        (sampling, seed, stream, routes, mode, n_ctx, unknown, ...), and it returns what
        Model.generate returns. A conversation that is not one raises
        moas.chat.ChatMessageError (a MoasValueError); a character outside the
        vocabulary, MoasValueError naming the message."""
        template = self._chat_template()
        prompt, room = self._chat_prompt(template, messages, max_tokens is None, params)
        return self.generate(prompt, room if max_tokens is None else max_tokens,
                             stop=_stop_list(stop) + template.stop, **params)

    def _chat_template(self):
        """The chat template, or MoasValueError if this vocabulary cannot write it."""
        from .chat import ChatTemplate
        template = ChatTemplate()
        why = template.unavailable(self.vocab)
        if why:
            raise MoasError(Status.ERR_INVALID_ARG, why)
        return template

    def _chat_prompt(self, template, messages, need_room, params):
        """(the conversation written as a prompt, the characters its context has left
        after it), each message checked (an error names it); with need_room a
        conversation that leaves none raises, rather than get an empty answer (as the
        server)."""
        from .chat import check_contents, conversation
        plain = conversation(messages)
        unknown = params.get("unknown", "error")
        check_contents(self.tokenize, plain, unknown)
        prompt = template.render(plain)
        n_ctx = params.get("n_ctx") or self.n_ctx_train
        used = len(self.tokenize(prompt, unknown=unknown))
        if need_room and used >= n_ctx:
            raise MoasError(Status.ERR_INVALID_ARG, "the context holds %d characters and "
                            "the conversation has %d: none is left for the answer"
                            % (n_ctx, used))
        return prompt, n_ctx - used

    def chat_batch(self, conversations, max_tokens=None, *, stop=(), per_prompt=None,
                   **params):
        """The answers to many conversations at once, as vLLM's LLM.chat gives them:
        each conversation written as Model.chat writes it, then all of them through
        Model.generate_batch (one KV pool, one batched decode a step). Returns its list
        of moas.engine.Completion, in the conversations' order; choice i of a
        conversation is Model.chat(conversation, max_tokens, seed=seed + i, ...) with
        the same arguments, character for character. max_tokens None is, for each
        conversation, the rest of its context (one that fills it raises); the
        template's stop strings are added to `stop` and to each per_prompt entry's.
        Keyword arguments are generate_batch's. A conversation that is not one raises
        moas.chat.ChatMessageError, and a character outside the vocabulary
        MoasValueError, naming the conversation and the message, before anything
        runs."""
        template = self._chat_template()
        prompts, own = [], []
        conversations = list(conversations)
        if per_prompt is not None and len(per_prompt) != len(conversations):
            raise MoasError(Status.ERR_INVALID_ARG, "per_prompt has %d entries for %d "
                            "conversations" % (len(per_prompt), len(conversations)))
        for k, messages in enumerate(conversations):
            try:
                prompt, room = self._chat_prompt(template, messages, max_tokens is None,
                                                 params)
            except MoasError as e:
                e.message = "conversation %d: %s" % (k, e.message)
                raise
            prompts.append(prompt)
            entry = dict(per_prompt[k] or {}) if per_prompt is not None else {}
            if max_tokens is None and "max_tokens" not in entry:
                entry["max_tokens"] = room
            if "stop" in entry:
                entry["stop"] = _stop_list(entry["stop"]) + template.stop
            own.append(entry)
        return self.generate_batch(prompts, 0 if max_tokens is None else max_tokens,
                                   stop=_stop_list(stop) + template.stop, per_prompt=own,
                                   **params)

    def generate_batch(self, prompts, max_tokens=128, **params):
        """The continuations of many prompts at once, as vLLM's LLM.generate makes them:
        every prompt's sequences share one KV pool (pages taken as tokens need them, a
        routed token only its scheme's heads) and each step advances all of them with
        one batched decode, each weight read once for all. Returns a list of
        moas.engine.Completion, in the prompts' order: .text, .choices (n of
        Choice(text, finish_reason, n_tokens, logprobs)), .prompt_tokens,
        .cached_tokens.

        Each result is what Model.generate gives alone, bit for bit: choice i of a
        prompt is Model.generate(prompt, max_tokens, seed=seed + i, ...) with the same
        arguments (sampling, stop, mode, n_ctx, kv_type, forced_scheme, unknown,
        context_shift: RoPE models only here). Keyword arguments are Model.generate's
        (not stream or routes) and:
          n               continuations of each prompt (1); they share the prompt's
                          pages (forks), choice i sampling with seed + i
          min_tokens      stop strings count only after this many characters (0);
          include_stop    the stop string that ends a text stays in it (False)
          pool_bytes      the KV pool's capacity (256 MiB of address space; memory is
                          taken only as pages are first used). Prompts that do not fit
                          at once wait for room, and a sequence that runs out of pages
                          is swapped out and back (docs/SERVING.md); one that does not
                          fit even alone raises MoasError(ERR_POOL_FULL) before anything
                          runs
          max_sequences   sequences decoded at once (64)
          page_heads      K/V heads per page (0: the library's default)
          prefill_chunk, step_prefill
                          prompt characters read per sequence and per step (64, 256)
          prompt_cache    finished prompts kept for later prompts that begin with them
                          (8; 0: none); what a later prompt takes from one is reported
                          in its cached_tokens and changes no bit of its text. Prompts
                          of the batch that begin alike (16 characters or more) have
                          that beginning read once, before them, and fork it (up to
                          prompt_cache such beginnings, those saving most first)
          logprobs        None, or k: each Choice's logprobs, per character of its
                          text, (log p, the k likeliest characters' (character, log p),
                          the character itself after them when it is not among them),
                          the model's own distribution, as the server's logprobs
          per_prompt      None, or a list with an entry per prompt: None, or a dict of
                          that prompt's own max_tokens, n, seed, sampling arguments,
                          stop, min_tokens, include_stop or logprobs (vLLM's
                          SamplingParams per prompt); the rest are the whole batch's
          on_result       None, or a function called as on_result(index, completion)
                          on the calling thread as each prompt ends (in the order they
                          end: a progress bar, or work on the texts while the rest run);
                          what it raises ends the call there, every page given back
        A prompt that is empty, longer than the context, or has characters the unknown
        rule refuses raises MoasValueError before anything runs, naming the prompt's
        index; a failure while running raises MoasError naming the first failing
        prompt, after every sequence's pages are given back. The call blocks; it runs
        the decode on a thread of its own."""
        from .engine import generate_batch
        return generate_batch(self, prompts, max_tokens, **params)

    def generate_batch_iter(self, prompts, max_tokens=128, **params):
        """generate_batch's results as they come: an iterator of (index, Completion),
        one per prompt, in the order the prompts end (a short prompt's result while the
        long ones still run). The same keyword arguments but on_result; the same
        results, bit for bit. Bad sampling arguments and prompts empty or refused by
        the tokenizer raise here, before anything runs; the engine's (mode, n_ctx,
        kv_type, pool_bytes, page_heads, n_threads, forced_scheme, context_shift) and a
        prompt too long for the context or too large for the pool, when the iteration
        begins; a prompt that fails while running raises its MoasError (naming it)
        where its result would have come. The decode runs on a thread of its own from
        the first next(); leaving the loop early (break or an exception when nothing
        else holds the iterator, close(), the iterator collected) stops it and gives
        back every page and thread; one kept in a variable decodes on until closed or
        dropped."""
        from .engine import generate_batch
        if "on_result" in params:
            raise TypeError("generate_batch_iter takes no on_result: its results are "
                            "what it yields")
        return generate_batch(self, prompts, max_tokens, _as_iterator=True, **params)

    def _generate(self, ctx, sampler, ids, max_tokens, stop, routes, context_shift):
        with ctx, sampler:
            sampler.accept(ids)
            logits = ctx.decode_batch(ids)
            window = list(ids)   # the tokens in the cache, for a decode again
            held, held_routes = "", []
            for _ in range(max_tokens):
                if ctx.n_past >= ctx.n_ctx and not context_shift:
                    break
                token = sampler.sample(logits)
                if ctx.n_past >= ctx.n_ctx:
                    self._make_room(ctx, window)
                logits = ctx.decode(token)
                window.append(token)
                held += self.token_text(token)
                if routes:
                    held_routes.append(ctx.route_lists(ctx.n_past - 1, 1)[0])
                end, found = find_stop(held, stop, more=True) if stop else (len(held), False)
                for i in range(end):
                    yield (held[i], held_routes[i]) if routes else held[i]
                held, held_routes = held[end:], held_routes[end:]
                if found:
                    return "stop"
            # nothing follows: what was held back (the start of a stop string) is text;
            # a stop string found whole here still ends it as a stop, as `moas generate`
            # and the server count it
            end, found = find_stop(held, stop, more=False) if stop else (len(held), False)
            for i in range(end):
                yield (held[i], held_routes[i]) if routes else held[i]
            return "stop" if found else "length"   # max_tokens, or a full context

    @staticmethod
    def _make_room(ctx, window):
        """Room in a full context for the next token, as `moas generate` makes it."""
        n_ctx = ctx.n_ctx
        sink = 4 if n_ctx >= 16 else 0   # the first tokens stay: attention sinks
        drop = (n_ctx - sink) // 2
        if drop > 0:
            try:
                ctx.shift(sink, drop)
                del window[sink:sink + drop]
                return
            except MoasError as e:
                if e.status != Status.ERR_INVALID_ARG:   # not "learned positions"
                    raise
        del window[:len(window) - n_ctx // 2]
        ctx.reset()
        ctx.decode_batch(window, logits="none")

    def perplexity(self, text, *, n_ctx=0, stride=0, unknown="error", mode="mixture",
                   n_threads=0):
        """exp(mean negative log-likelihood) of `text`'s characters, scored as `moas
        perplexity [--stride S]` scores them: windows of n_ctx tokens (0: the trained
        length), each from an empty cache. stride 0: consecutive windows, each
        character after a window's first scored; stride S (1 to n_ctx): windows S
        apart, each scoring only the S characters it adds, the rest its context (a
        sliding window, as long-context evaluations score). Returns a Perplexity
        (perplexity, nll, n_scored, n_chars, n_changed). Logits that give a token no
        finite log-likelihood (a damaged model's NaN) raise MoasValueError naming it."""
        stride = _int("stride", stride)
        ids, changed = self.tokenize_ex(text, unknown=unknown)
        if len(ids) < 2:
            raise MoasError(Status.ERR_INVALID_ARG, "perplexity needs at least 2 "
                            "characters, got %d" % len(ids))
        total, scored = 0.0, 0
        with Context(self, n_ctx=n_ctx, mode=mode, n_threads=n_threads) as ctx:
            window = ctx.n_ctx
            if window < 2:   # a window of one token scores nothing
                raise MoasError(Status.ERR_INVALID_ARG, "perplexity needs windows of at "
                                "least 2 tokens, n_ctx is %d" % window)
            if not 0 <= stride <= window:
                raise MoasError(Status.ERR_INVALID_ARG, "stride %d is outside [0, %d] (the "
                                "context)" % (stride, window))
            for start in range(0, len(ids), stride or window):
                chunk = ids[start:start + window]
                if len(chunk) < 2:
                    break
                ctx.reset()
                rows = ctx.decode_batch(chunk, logits="all")
                # a window's first token has no logits before it; a sliding one scores
                # from the first token the window before it did not
                skip = 1 if start == 0 or stride in (0, window) else window - stride
                for j in range(skip, len(chunk)):
                    row, nxt = rows[j - 1], chunk[j]
                    peak = max(row)
                    lse = peak + math.log(sum(math.exp(x - peak) for x in row))
                    nll = lse - row[nxt]
                    if not math.isfinite(nll):   # a damaged model: summed, it gave nan
                        raise MoasError(Status.ERR_CORRUPT, "the logits scoring token %d "
                                        "of the text are not finite (NaN or infinity): "
                                        "the model computes no probability for it"
                                        % (start + j))
                    total += nll
                    scored += 1
                if stride and start + window >= len(ids):
                    break
        nll = total / scored
        try:
            ppl = math.exp(nll)
        except OverflowError:   # beyond about 709 nats: infinity, as C's exp (the CLI)
            ppl = math.inf
        return Perplexity(ppl, nll, scored, len(ids) + (changed if unknown == "drop" else 0),
                          changed)

    def logits(self, text, *, mode="mixture", unknown="error"):
        """Every position's logits for `text` (one window: at most the trained length):
        a numpy float32 array [n_tokens, n_vocab] when numpy is importable, else a list
        of n_tokens memoryviews of n_vocab floats."""
        ids = self.tokenize(text, unknown=unknown)
        with Context(self, mode=mode) as ctx:
            if len(ids) > ctx.n_ctx:
                raise MoasError(Status.ERR_INVALID_ARG, "the text is %d characters, the "
                                "context holds %d" % (len(ids), ctx.n_ctx))
            rows = ctx.decode_batch(ids, logits="all")
        np = _numpy()
        if np is None:
            return rows
        if not rows:   # the empty text: no rows, still an array (it was the list [])
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return np.frombuffer(rows[0].obj, dtype=np.float32).reshape(len(ids), self.n_vocab)

    def __repr__(self):
        if self._ptr is None:
            return "<moas.Model closed>"
        return "<moas.Model %r: %d layers, %d heads, schemes %s, vocab %d>" % (
            self.name, self.n_layer, self.n_head, self.schemes, self.n_vocab)


# ---- context --------------------------------------------------------------------------

_CALLBACK_ERROR_ORDER = itertools.count()   # when each callback's error was raised

Routes = namedtuple("Routes", "gates schemes kv_heads")
Routes.__doc__ = """Routing of a range of positions: memoryviews of Python-owned copies,
gates float [n_pos][n_layer][n_scheme], schemes and kv_heads int32 [n_pos][n_layer]."""


class Context(_Handle):
    """An inference stream (moas_context): KV cache, position, routing records.

    Parameters, all optional, as moas_context_params: n_ctx (0: trained length),
    n_threads (0: every CPU the process may run on, within its cgroup's CPU quota),
    mode ("mixture" | "routed" or Mode), kv_type
    ("f32" | "f16" | "q8_0" or Type), kernels ("auto" | "ref"), forced_scheme (-1: the router),
    kv_budget (bytes, 0: none), route_callback (see set_route_callback), abort_callback
    (see set_abort_callback), log (fn(level, message)), allocator (an Allocator).
    """

    _kind = "context"

    def __init__(self, model, *, n_ctx=0, n_threads=0, mode=Mode.MIXTURE, kv_type=Type.F32,
                 kernels=Kernels.AUTO, forced_scheme=-1, kv_budget=0, route_callback=None,
                 abort_callback=None, log=None, allocator=None, pool=None, n_batch=0,
                 _fork_of=None):
        self._ptr = None
        if not isinstance(model, Model):
            raise TypeError("a Context is made from a Model, not %s" % type(model).__name__)
        self.pool = pool
        # weak references to the logits views handed out since the last decode: a
        # view keeps the context (see logits()), so the context must not keep it
        self._views = []
        self._route = None
        self._route_fn = None
        self._abort = None
        self._abort_fn = None
        self._callback_error = None   # a route or abort callback's, raised after the call
        self._lock = threading.RLock()   # one call at a time; close waits for it
        self._calling = None             # the thread inside a decoding call
        self.model = model
        params = _params(library().moas_context_params_init_sized, ContextParams)
        params.n_ctx, params.n_threads = _int("n_ctx", n_ctx), _int("n_threads", n_threads)
        params.mode = _enum(Mode, mode)
        params.kv_type = _enum(Type, kv_type)
        params.kernels = _enum(Kernels, kernels)
        params.forced_scheme = _int("forced_scheme", forced_scheme)
        params.kv_budget_bytes = _int("kv_budget", kv_budget, ctypes.c_uint64)
        self._log = _log_callback(log)
        params.log = self._log
        self._allocator = allocator
        params.allocator = _allocator(allocator)
        self._route_fn = route_callback
        self._route = self._route_callback(route_callback)
        params.route_fn = self._route
        # not a creation parameter in C: installed once the context exists
        self._abort_fn = abort_callback
        self._abort = self._abort_callback(abort_callback)
        params.n_batch = _int("n_batch", n_batch)
        if pool is not None:
            if not isinstance(pool, Pool):
                raise TypeError("pool must be a Pool, not %s" % type(pool).__name__)
            if pool.model is not model:
                raise MoasError(Status.ERR_INVALID_ARG, "the pool was made for another model")
        out = ctypes.c_void_p()
        # a call on the model (and the pool) until this context counts as its dependent:
        # their close() on another thread waits for it, then closes the context first
        with model._use() as model_ptr, \
                (pool._use() if pool is not None else contextlib.nullcontext()) as pool_ptr:
            params.pool = pool_ptr
            if _fork_of is not None:   # its own callback: its errors are its own
                # the library copies the parent's log callback and allocator into the
                # fork: what they point to must live as long as the fork
                self._log, self._allocator = _fork_of._log, _fork_of._allocator
                self._route_fn = _fork_of._route_fn
                self._route = self._route_callback(self._route_fn)
                self._abort_fn = _fork_of._abort_fn
                self._abort = self._abort_callback(self._abort_fn)
                with _fork_of._lock:
                    _fork_of._check_not_inside("fork")
                    _fork_of._calling = threading.get_ident()   # as in Context._call
                    try:
                        status = library().moas_context_fork(_fork_of._p(), ctypes.byref(out))
                    finally:
                        _fork_of._calling = None
                    _check(status)
                if self._route_fn is not None:
                    library().moas_context_set_route_callback(out.value, self._route, None)
            else:
                _check(library().moas_context_create(model_ptr, ctypes.byref(params),
                                                     ctypes.byref(out)))
            # a fork's too: the library gave it the parent's, whose errors are the parent's
            if self._abort_fn is not None:
                library().moas_context_set_abort_callback(out.value, self._abort, None)
            self._ptr = out.value
            # fixed at creation: read without a library call (a call releases the
            # interpreter lock, and a server's engine thread asks every step)
            self._n_ctx = library().moas_context_n_ctx(out.value)
            self._n_vocab = model.n_vocab
            self._n_layer = model.n_layer
            self._n_scheme = model.n_scheme
            self._depend_on(model)
            if pool is not None:
                self._depend_on(pool)

    # lifetime
    def close(self):
        """Close the context (after a call another thread is making on it ends):
        the logits views it handed out are released, and its library object is
        freed, at once or, while buffers made from a logits view (slices, casts, a
        numpy array) are alive, when the last of them goes. Idempotent; refused from
        its own route callback."""
        with self._lock:
            self._check_not_inside("close")
            self._invalidate()
            self._release()

    def _free(self, ptr):
        library().moas_context_free(ptr)
        self._freed()

    def _inside_call(self, me):
        return self._calling == me

    def _check_not_inside(self, what):
        if self._calling == threading.get_ident():
            raise MoasError(Status.ERR_BUSY, "%s: a route callback, abort callback or log "
                            "callback must not use the context it was called from" % what)

    def _call(self, name, *args):
        with self._lock:
            self._check_not_inside(name[5:])
            # a log callback runs inside any call (a failing one logs its error): one
            # that closed this context got the library's refusal while Python counted
            # it freed (a leak, freed after its pool and model) and replaced the error
            self._calling, prev = threading.get_ident(), self._calling
            try:
                return _Handle._call(self, name, *args)
            finally:
                self._calling = prev


    # the logits view
    def _invalidate(self):
        """Release every logits view handed out: the buffer is about to change. What
        was made from a view (a slice, a cast, numpy) is not released: it keeps the
        buffer's array, so the library object waits for it (_held_by)."""
        for ref in self._views:
            view = ref()
            if view is None:
                continue
            try:
                view.release()
            except BufferError:   # something still exports it (numpy)
                pass
        self._views.clear()

    def logits(self):
        """The last decoded token's logits as a read-only memoryview of n_vocab floats
        over the library's buffer (no copy), or None when there are none (nothing
        decoded since creation, reset or truncate, or decode_batch with logits="none").

        The view is released by the next decode, decode_batch, truncate, reset,
        load_state, compact, Pool.decode or close (then any use raises ValueError),
        unless logits_array()'s numpy array still exports it. Buffers made from it
        (slices, casts, memoryview(view), that numpy array) are not released: they
        read the same buffer, so a later decode or load_state shows its logits
        through them (copy what must be kept), and they keep that memory valid: the
        context's library object, and with it its Pool's and Model's, is freed only
        after the last of them is gone, even when the context, its Pool or its Model
        is closed or dropped first. After close they read the values the context last
        held."""
        with self._lock:   # close() on another thread cannot free it under us
            while self._views:
                view = self._views[-1]()
                if view is not None:
                    try:
                        view.nbytes   # still usable, unless its holder released it
                        return view
                    except ValueError:
                        pass
                self._views.pop()
            ptr = self._call("moas_context_logits")
            if not ptr:
                return None
            # every view, slice, cast and numpy array over the buffer references this
            # array: the library object is freed only after it is collected
            array = _array_type(ctypes.c_float, self._n_vocab, exact=True).from_address(
                ctypes.addressof(ptr.contents))
            self._held_by(array)
            raw = memoryview(array)
            view = raw.cast("B").cast("f").toreadonly()
            raw.release()
            self._views.append(weakref.ref(view))
            return view

    # decoding
    def _run(self, name, *args):
        """Call a decoding function; a route callback's exception undoes the call
        (truncate restores the exact earlier state) and is raised, as is an abort
        callback's (which stopped the call: the library undid it)."""
        with self._lock:
            n_past = self._call("moas_context_n_past")
            self._invalidate()
            self._callback_error = None
            self._calling = threading.get_ident()
            try:
                status = self._call_inside(name, *args)
            finally:
                self._calling = None
            if self._callback_error is not None:
                error, self._callback_error = self._callback_error, None
                if status == Status.OK:
                    self._call("moas_context_truncate", n_past)
                raise error
            _check(status)

    def _call_inside(self, name, *args):
        return _Handle._call(self, name, *args)

    def decode(self, token):
        """Decode one token; returns the logits view (see logits())."""
        # one hold of the lock: another thread's reset or decode between the call and
        # the view made this return None or that thread's logits
        with self._lock:
            self._run("moas_context_decode", token, None)
            return self.logits()

    def decode_batch(self, tokens, logits="last"):
        """Decode consecutive tokens, all or none. `logits` "last" (default) returns the
        logits view, "none" returns None (and leaves no logits), "all" returns a new
        list of n_tokens memoryviews of n_vocab floats, rows of one new buffer that the
        caller owns."""
        which = _enum(Logits, logits)
        ids, n_tokens = _ids(tokens)
        tokens = range(n_tokens)   # only its length below
        flat = out = None
        with self._lock:   # the view of this call's logits, as decode()
            if which == Logits.ALL:
                self._check_room(len(tokens))   # before a buffer sized by the caller's count
                flat, out = _float_rows(len(tokens) * self._n_vocab)
            self._run("moas_context_decode_batch", ids, len(tokens), out, which)
            if which == Logits.LAST:
                return self.logits()
        if which == Logits.ALL:
            v = self._n_vocab
            return [flat[i * v:(i + 1) * v] for i in range(len(tokens))]
        return None

    def _check_room(self, n_tokens):
        """MoasValueError (ERR_CONTEXT_FULL) when n_tokens more do not fit n_ctx, as
        the library would say, but before logits rows are allocated for them."""
        n_past, n_ctx = self.n_past, self.n_ctx
        if n_tokens > n_ctx - n_past:
            raise MoasError(Status.ERR_CONTEXT_FULL, "decode_batch: %d tokens after %d "
                            "do not fit a context of %d" % (n_tokens, n_past, n_ctx))

    # reset, truncate, compact and load_state release the views under the lock of
    # their call: released before it, a view another thread made in between outlived
    # the change
    def reset(self):
        with self._lock:
            self._invalidate()
            self._call("moas_context_reset")

    def truncate(self, n_keep):
        with self._lock:
            self._invalidate()
            _check(self._call("moas_context_truncate", n_keep))

    # state
    n_past = property(lambda self: self._call("moas_context_n_past"))
    @property
    def n_ctx(self):
        self._p()   # a closed context's raises, as every call on it does
        return self._n_ctx
    mode = property(lambda self: Mode(self._call("moas_context_mode")))
    kernels_name = property(lambda self: self._call("moas_context_kernels_name").decode())

    # routing
    def routes(self, pos=0, n_pos=None):
        """Routes of positions [pos, pos + n_pos) (default: to n_past)."""
        L, S = self._n_layer, self._n_scheme
        # ints before the arithmetic that sizes the buffers (a float n_pos failed in it
        # with AttributeError)
        pos = _index("pos", pos)
        n_pos = None if n_pos is None else _index("n_pos", n_pos)
        # one hold of the lock: the buffers are sized for the n_past the library then
        # reads (another thread's decode in between made it write past them)
        with self._lock:
            n_past = self.n_past
            if n_pos is None:
                n_pos = max(n_past - pos, 0)
            # buffers only for a range the context holds: outside it the library refuses
            # before writing, and sizing them from n_pos first could ask for gigabytes
            held = 0 <= pos and 0 <= n_pos and pos + n_pos <= n_past
            n_buf = n_pos if held else 0
            gates = _array(ctypes.c_float, n_buf * L * S)
            schemes = _array(ctypes.c_int32, n_buf * L)
            heads = _array(ctypes.c_int32, n_buf * L)
            _check(self._call("moas_context_routes", pos, n_pos, gates, schemes, heads))

        def view(buf, fmt, shape, n):
            v = memoryview(buf).cast("B")[:4 * n]
            return v.cast(fmt, shape) if n_pos else v.cast(fmt)
        return Routes(view(gates, "f", (n_pos, L, S), n_pos * L * S),
                      view(schemes, "i", (n_pos, L), n_pos * L),
                      view(heads, "i", (n_pos, L), n_pos * L))

    def route_lists(self, pos=0, n_pos=None):
        """routes() as plain lists: per position {"schemes": [scheme per layer],
        "gates": [[gate per scheme] per layer]}."""
        r = self.routes(pos, n_pos)
        schemes, gates = r.schemes.tolist(), r.gates.tolist()
        return [{"schemes": s, "gates": g} for s, g in zip(schemes, gates)]

    def logits_array(self):
        """logits() as a numpy float32 array over the same memory (no copy, read-only)
        when numpy is importable, else the memoryview itself; None when there are no
        logits. The array is made from the view, so the view cannot be released while
        the array lives; it holds the current logits until the next decode (or
        load_state), which overwrites them in place, and keeps the context's memory
        valid, after close too, until it is gone (see logits())."""
        view = self.logits()
        np = _numpy()
        if view is None or np is None:
            return view
        return np.frombuffer(view, dtype=np.float32)

    def scheme_counts(self, layer=-1):
        """Stored tokens per scheme in `layer`, or token-layer pairs for -1."""
        counts = _array(ctypes.c_int32, self._n_scheme, exact=True)
        _check(self._call("moas_context_scheme_counts", layer, counts))
        return list(counts)

    def force_scheme(self, scheme):
        _check(self._call("moas_context_force_scheme", scheme))

    def set_kv_budget(self, nbytes):
        _check(self._call("moas_context_set_kv_budget", nbytes))

    def _route_callback(self, fn):
        if _callback("route_callback", fn) is None:
            return ROUTE_FN()
        ref = weakref.ref(self)   # no cycle through the C callback

        def route(_user, pos, layer, gates, n_scheme, proposed):
            try:
                choice = fn(pos, layer, tuple(gates[:n_scheme]), proposed)
                if choice is None:
                    return proposed
                choice = _index("a route callback's scheme", choice)
                # beyond int32 it is out of range, as the library would see it: `proposed`
                return choice if -2**31 <= choice < 2**31 else proposed
            except BaseException as e:   # cannot cross the C frames: raised after the call
                ctx = ref()
                if ctx is not None and ctx._callback_error is None:
                    ctx._callback_error = e
                    # Pool.decode raises the first of its contexts' errors
                    ctx._callback_error_order = next(_CALLBACK_ERROR_ORDER)
                return proposed
        return ROUTE_FN(route)

    def set_route_callback(self, fn):
        """Install fn(pos, layer, gates, proposed) -> scheme or None (keep `proposed`),
        called per token and layer; or remove it with None. Routed mode uses the answer
        (a KV budget still applies); mixture mode only observes. If fn raises, or
        answers neither an integer nor None (TypeError), the decode is undone and the
        exception propagates from decode()."""
        callback = self._route_callback(fn)
        # one hold of the lock: another thread's set between the call and keeping the
        # callback left the library calling one that was no longer kept (freed)
        with self._lock:
            self._call("moas_context_set_route_callback", callback, None)
            self._route, self._route_fn = callback, fn

    def _abort_callback(self, fn):
        if _callback("abort_callback", fn) is None:
            return ABORT_FN()
        ref = weakref.ref(self)   # no cycle through the C callback

        def abort(_user):
            try:
                return 1 if fn() else 0
            except BaseException as e:   # cannot cross the C frames: raised after the call
                ctx = ref()
                if ctx is not None and ctx._callback_error is None:
                    ctx._callback_error = e
                    ctx._callback_error_order = next(_CALLBACK_ERROR_ORDER)
                return 1   # stop: the library undoes the call, then it is raised
        return ABORT_FN(abort)

    def set_abort_callback(self, fn):
        """Install fn() -> truthy to stop, asked by decode, decode_batch and Pool.decode
        before each block of tokens and between layers, on the decoding thread; or
        remove it with None. A stopped call raises MoasError(ERR_ABORTED) and is undone:
        n_past, the cache and the pages are as before it, and logits() is None until
        the next decode. If fn raises, the call is stopped the same way and the
        exception propagates instead. A fork keeps its parent's abort callback."""
        callback = self._abort_callback(fn)
        with self._lock:   # as set_route_callback
            self._call("moas_context_set_abort_callback", callback, None)
            self._abort, self._abort_fn = callback, fn

    def _layer(self, layer):
        # an int first: 5.5 was "layer 5 outside", a str a comparison's TypeError
        layer = _index("layer", layer)
        if not -1 <= layer < self._n_layer:
            raise MoasError(Status.ERR_INVALID_ARG,
                            "layer %d outside [-1, %d)" % (layer, self._n_layer))
        return layer

    def kv_bytes_used(self, layer=-1):
        return self._call("moas_context_kv_bytes_used", self._layer(layer))

    def kv_bytes_reserved(self, layer=-1):
        return self._call("moas_context_kv_bytes_reserved", self._layer(layer))

    # pages, fork, saved state
    kv_pages = property(lambda self: self._call("moas_context_kv_pages"))
    kv_bytes_held = property(lambda self: self._call("moas_context_kv_bytes_held"))

    def fork(self):
        """A new Context that continues from this one's tokens, sharing its full KV pages
        copy on write (moas_context_fork). The context must be in a Pool."""
        if self.pool is None:
            raise MoasError(Status.ERR_INVALID_ARG,
                            "fork needs a context created in a Pool (pool=...)")
        return Context(self.model, pool=self.pool, _fork_of=self)

    def compact(self, n_before, scheme):
        """Pool the K/V of tokens before `n_before` down to `scheme` (routed mode, pooled
        K/V models; moas_context_compact). Returns the token-layer pairs changed."""
        changed = ctypes.c_int32()
        with self._lock:
            self._invalidate()
            _check(self._call("moas_context_compact", n_before, scheme,
                              ctypes.byref(changed)))
        return changed.value

    def shift(self, n_keep, n_discard):
        """RoPE models: drop tokens [n_keep, n_keep + n_discard) and move the later ones
        down without decoding them again (moas_context_shift)."""
        _check(self._call("moas_context_shift", n_keep, n_discard))

    def save_state(self):
        """The sequence (its tokens' K/V, routing records, position, logits) as bytes."""
        # one hold of the lock: another thread's decode after the size was read made
        # the state too large for the buffer (MOAS_ERR_BUFFER_TOO_SMALL)
        with self._lock:
            n = self._call("moas_context_state_size")
            buf, arg = _exact(ctypes.c_char, n)
            written = ctypes.c_size_t()
            _check(self._call("moas_context_state_save", arg, n, ctypes.byref(written)))
        return bytes(memoryview(buf)[:written.value])

    def load_state(self, data):
        """Replace this context's sequence with one saved by save_state(); all or nothing."""
        data = bytes(memoryview(data))   # a buffer: bytes(5) would be five NULs
        with self._lock:
            self._invalidate()
            _check(self._call("moas_context_state_load", data, len(data)))

    def kv_token_bytes(self, scheme=-1):
        """Bytes one token occupies over all layers: mixture mode's storage for -1,
        routed mode's for a token routed to `scheme` (moas_context_kv_token_bytes)."""
        scheme = _index("scheme", scheme)   # as _layer
        if not -1 <= scheme < self._n_scheme:
            raise MoasError(Status.ERR_INVALID_ARG,
                            "scheme %d outside [-1, %d)" % (scheme, self._n_scheme))
        return self._call("moas_context_kv_token_bytes", scheme)

    @property
    def n_threads(self):
        """Threads a decoding call uses (0 in the params resolved at creation)."""
        return self._call("moas_context_n_threads")

    def __repr__(self):
        if self._ptr is None:
            return "<moas.Context closed>"
        if self._calling == threading.get_ident():   # from its callback: no calls on it
            return "<moas.Context of %d tokens, in a call>" % self._n_ctx
        return "<moas.Context %s, %d/%d tokens, kernels %s>" % (
            self.mode.name.lower(), self.n_past, self.n_ctx, self.kernels_name)


# ---- KV pool ---------------------------------------------------------------------------


class PoolStats(namedtuple("PoolStats", [
        "page_heads", "page_bytes", "n_pages", "pages_free", "n_contexts", "bytes_capacity",
        "bytes_held", "bytes_used", "bytes_stored", "n_threads"])):
    """moas_pool_info: capacity and occupancy of a Pool, and the threads of its decode()
    (n_threads as given, or for 0 what it resolved to)."""


class Pool(_Handle):
    """A KV pool (moas_pool) that many Contexts of one model take pages from.

    capacity_bytes (required), kv_type ("f32" | "f16" | "q8_0": head_dim a multiple of
    32), page_heads (0: default),
    n_threads (0: every CPU the process may run on, within its cgroup's CPU quota),
    kernels, n_batch (rows per block of decode()),
    steer_below (routed contexts take cheaper schemes while the free fraction of pages
    is below it; 0: never), commit (write every page and decode() buffer now, so the
    pool's memory is resident from the start and RSS stays flat while sequences come
    and go).
    Contexts made with pool.context(...) or Context(model, pool=pool) are closed by
    the pool's close(), before it; each holds the pool, so the pool stays open while
    any of them is in use.
    """

    _kind = "pool"

    def __init__(self, model, capacity_bytes, *, kv_type=Type.F32, page_heads=0, n_threads=0,
                 kernels=Kernels.AUTO, n_batch=0, steer_below=0.0, commit=False, log=None):
        self._ptr = None
        if not isinstance(model, Model):
            raise TypeError("a Pool is made from a Model, not %s" % type(model).__name__)
        self._dependents = weakref.WeakSet()
        self._users, self._users_cond, self._closing = {}, threading.Condition(), False
        self.model = model
        params = _params(library().moas_pool_params_init_sized, PoolParams)
        params.capacity_bytes = _int("capacity_bytes", capacity_bytes, ctypes.c_uint64)
        params.kv_type = _enum(Type, kv_type)
        params.page_heads, params.n_threads, params.n_batch = (
            _int("page_heads", page_heads), _int("n_threads", n_threads),
            _int("n_batch", n_batch))
        params.steer_below = _real("steer_below", steer_below)
        params.commit = 1 if commit else 0
        params.kernels = _enum(Kernels, kernels)
        self._log = _log_callback(log)
        params.log = self._log
        out = ctypes.c_void_p()
        with model._use() as model_ptr:   # until it counts as the model's dependent
            _check(library().moas_pool_create(model_ptr, ctypes.byref(params),
                                              ctypes.byref(out)))
            self._ptr = out.value
            self._n_vocab = model.n_vocab
            self._depend_on(model)

    def close(self):
        """Close the pool's contexts (each after a call on it ends), then the pool,
        after the calls other threads are making on it end (a context being made in
        it included). Idempotent."""
        if self._ptr is None:
            return
        self._stop_calls()
        self._close_owner()

    def _call(self, name, *args):
        with self._use():
            return _Handle._call(self, name, *args)

    def _free(self, ptr):
        library().moas_pool_free(ptr)
        self._freed()

    def context(self, **params):
        """A Context in this pool (keyword arguments as Context's)."""
        return Context(self.model, pool=self, **params)

    def stats(self):
        info = PoolInfo()
        info.size = ctypes.sizeof(PoolInfo)
        _check(self._call("moas_pool_stats", ctypes.byref(info)))
        return PoolStats(*(getattr(info, f) for f, _ in PoolInfo._fields_[1:]))

    def decode(self, seqs, logits="last"):
        """Advance many contexts of this pool in one call (moas_pool_decode): `seqs` is a
        list of (context, tokens) pairs. Each context gets exactly what decode_batch
        would give it alone. Returns, per pair, the logits as decode_batch would
        ("last": a copy of the last token's n_vocab floats, "all": a list of rows,
        "none": None); `logits` is one of those for every pair, or a list of them, one
        per pair (a server scoring one request's prompt and sampling the others). If a
        route callback raises, the call is undone, every context back to its n_past
        before it, and the first exception raised is raised. An abort callback of any
        of the contexts stops the whole call: MoasError(ERR_ABORTED) (or what it
        raised), every context as before it."""
        seqs = list(seqs)
        if isinstance(logits, (list, tuple)):
            if len(logits) != len(seqs):
                raise MoasError(Status.ERR_INVALID_ARG, "logits: %d values for %d "
                                "(context, tokens) pairs" % (len(logits), len(seqs)))
            whiches = [_enum(Logits, w) for w in logits]
        else:
            whiches = [_enum(Logits, logits)] * len(seqs)
        v = self._n_vocab
        # the arrays themselves go into the struct (ctypes.cast() would tie each into a
        # reference cycle), all of cached types (_array)
        arr = _array(PoolSeq, len(seqs))
        outs = []
        for i, ((ctx, tokens), which) in enumerate(zip(seqs, whiches)):
            ids, n_tokens = _ids(tokens)
            tokens = range(n_tokens)   # only its length below
            flat = out = None
            if not isinstance(ctx, Context):
                raise TypeError("seqs are (Context, tokens) pairs, not (%s, ...)"
                                % type(ctx).__name__)
            if which == Logits.ALL:
                ctx._check_room(len(tokens))
                flat, out = _float_rows(len(tokens) * v)
            elif which == Logits.LAST:
                out = _array(ctypes.c_float, v, exact=True)
                flat = _floats(out, v)
            outs.append((ctx, flat, len(tokens), which))
            arr[i].tokens, arr[i].n_tokens = ids, len(tokens)
            arr[i].which = which
            arr[i].logits = out
        # each context held for the call (another thread's close waits); none from its
        # route or abort callback
        ctxs = list({id(ctx): ctx for ctx, _ in seqs}.values())
        with contextlib.ExitStack() as held:
            _hold_all([ctx._lock for ctx in ctxs], held)
            for ctx in ctxs:
                ctx._check_not_inside("pool decode")
            for i, (ctx, _) in enumerate(seqs):
                ctx._invalidate()
                arr[i].ctx = ctx._p()
            # where every context goes back if a callback raises; with no callback in
            # the call nothing raises, and the calls are saved (each one releases the
            # interpreter lock, per context and step in a server's engine thread)
            n_past = ({ctx: ctx._call("moas_context_n_past") for ctx in ctxs}
                      if any(ctx._route_fn is not None or ctx._abort_fn is not None
                             for ctx in ctxs) else {})
            me = threading.get_ident()
            for ctx in ctxs:
                ctx._calling = me
                ctx._callback_error = None
            try:
                status = self._call("moas_pool_decode", arr, len(seqs))
            finally:
                for ctx in ctxs:
                    ctx._calling = None
            failed = [ctx for ctx in ctxs if ctx._callback_error is not None]
            if failed:   # as decode_batch: the whole call undone, the first error raised
                first = min(failed, key=lambda ctx: ctx._callback_error_order)
                error = first._callback_error
                for ctx in failed:
                    ctx._callback_error = None
                if status == Status.OK:
                    for ctx in n_past:
                        if ctx._call("moas_context_n_past") != n_past[ctx]:
                            ctx._call("moas_context_truncate", n_past[ctx])
                raise error
            _check(status)
            # a pair of no tokens gets what its context holds (as decode_batch([])),
            # copied while the locks are held: after them another thread's decode gave
            # its logits, or released the view being copied (ValueError)
            held_logits = {}
            for ctx, _, n, which in outs:
                if n == 0 and which == Logits.LAST:
                    last = ctx.logits()
                    held_logits[id(ctx)] = None if last is None else _floats(
                        _array_type(ctypes.c_float, v, exact=True).from_buffer_copy(last), v)
        result = []
        for ctx, flat, n, which in outs:
            if n == 0 and which == Logits.LAST:
                result.append(held_logits[id(ctx)])
                continue
            if flat is None or n == 0:
                result.append(None)
                continue
            result.append([flat[i * v:(i + 1) * v] for i in range(n)]
                          if which == Logits.ALL else flat)
        return result

    def __repr__(self):
        if self._ptr is None:
            return "<moas.Pool closed>"
        st = self.stats()
        return "<moas.Pool %d/%d pages free, %d contexts>" % (st.pages_free, st.n_pages,
                                                              st.n_contexts)


def _hold_all(locks, held):
    """Take every lock, never waiting for one while holding another, and give each to
    `held` (an ExitStack) to release. Another thread may hold one of them and want one
    of ours: a route callback of a pool call, decoding a context this call names while
    its own context, also named here, stays held until that call ends. So wait for one
    lock alone, then try the rest without waiting; if one is taken, let go and wait
    for that one. Each lock taken goes on an ExitStack at once, so that an exception
    (a KeyboardInterrupt between two of them) lets go of those already taken."""
    first = 0
    while locks:
        with contextlib.ExitStack() as attempt:
            attempt.enter_context(locks[first])
            busy = None
            for i, lock in enumerate(locks):
                if i == first:
                    continue
                if not lock.acquire(blocking=False):
                    busy = i
                    break
                attempt.callback(lock.release)
            if busy is None:
                held.enter_context(attempt.pop_all())
                return
        first = busy


# ---- sampler --------------------------------------------------------------------------


class Sampler(_Handle):
    """Chooses tokens from logits (moas_sampler): the logits get `logit_bias` (a dict
    {token id: bias}, -inf bans) and the penalties of the last `repeat_last_n` tokens
    sampled or accept()ed, once per distinct token: its logit divided by
    `repeat_penalty` (multiplied if not positive), then `frequency_penalty` times its
    count plus `presence_penalty` subtracted (OpenAI's); then greedy when
    temperature is 0, else softmax(logits / temperature) cut to top_k, top_p, then
    min_p, drawn from a seeded stream. `vocab` is a Model or the number of logits.
    Stop strings are text: see find_stop()."""

    _kind = "sampler"

    def __init__(self, vocab, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, min_p=0.0,
                 repeat_penalty=1.0, repeat_last_n=64, logit_bias=None, allocator=None,
                 frequency_penalty=0.0, presence_penalty=0.0):
        self._ptr = None
        self._lock = threading.RLock()   # one call at a time; close waits for it
        self.n_vocab = vocab.n_vocab if isinstance(vocab, Model) else _int("n_vocab", vocab)
        params = _params(library().moas_sampler_params_init_sized, SamplerParams)
        params.temperature, params.top_k, params.top_p, params.seed = (
            _real("temperature", temperature), _int("top_k", top_k), _real("top_p", top_p),
            _int("seed", seed, ctypes.c_uint64))
        params.min_p, params.repeat_penalty, params.repeat_last_n = (
            _real("min_p", min_p), _real("repeat_penalty", repeat_penalty),
            _int("repeat_last_n", repeat_last_n))
        params.frequency_penalty, params.presence_penalty = (
            _real("frequency_penalty", frequency_penalty),
            _real("presence_penalty", presence_penalty))
        biases = sorted((_int("logit_bias token", t), _real("logit_bias[%r]" % (t,), b))
                        for t, b in dict(logit_bias or {}).items())
        bias_array = _array(LogitBias, len(biases))
        for i, (t, b) in enumerate(biases):
            bias_array[i].token, bias_array[i].bias = t, b
        params.n_logit_bias = len(biases)
        params.logit_bias = bias_array   # copied by the library at creation
        self._allocator = allocator
        params.allocator = _allocator(allocator)
        out = ctypes.c_void_p()
        _check(library().moas_sampler_create(ctypes.byref(params), self.n_vocab,
                                             ctypes.byref(out)))
        self._ptr = out.value

    def close(self):
        """Free the sampler, after a call another thread is making on it ends.
        Idempotent."""
        with self._lock:
            if self._ptr is not None:
                library().moas_sampler_free(self._ptr)
                self._ptr = None

    def _pointer(self, logits):
        """A float pointer to n_vocab logits, and what keeps them alive."""
        if isinstance(logits, Context):
            if logits._n_vocab != self.n_vocab:
                raise MoasError(Status.ERR_INVALID_ARG, "the context's model has %d logits, "
                                "the sampler needs %d" % (logits._n_vocab, self.n_vocab))
            ptr = logits._call("moas_context_logits")
            if not ptr:
                raise MoasError(Status.ERR_INVALID_ARG, "the context has no logits")
            return ptr, logits
        try:
            view = memoryview(logits)
        except TypeError:
            values = list(logits)   # a plain sequence: copied
            if len(values) != self.n_vocab:
                raise MoasError(Status.ERR_INVALID_ARG, "%d logits, the sampler needs %d"
                                % (len(values), self.n_vocab)) from None
            buf = _array_type(ctypes.c_float, self.n_vocab, exact=True)(*values)
            return buf, buf
        if view.itemsize != 4 or view.format not in ("f", "<f", "=f") or \
                view.nbytes != 4 * self.n_vocab:
            raise MoasError(Status.ERR_INVALID_ARG, "logits must be %d float32 values"
                            % self.n_vocab)
        floats = _array_type(ctypes.c_float, self.n_vocab, exact=True)
        if not view.c_contiguous:   # a strided slice: its values, copied in order
            buf = floats.from_buffer_copy(view.tobytes())
        elif view.readonly:   # our logits view, bytes, ...: copy (n_vocab floats)
            buf = floats.from_buffer_copy(view.cast("B"))
        else:
            buf = floats.from_buffer(view.cast("B"))
        return buf, buf

    def sample(self, logits):
        """A token id chosen from `logits`: n_vocab float32 values as a buffer (the
        view from Context.logits(), array('f'), ...), a sequence, or a Context (its
        current logits, read in place)."""
        if logits is None:   # decode_batch(..., logits="none") or of no tokens
            raise MoasError(Status.ERR_INVALID_ARG, "no logits to sample from (nothing "
                            "decoded, or decoded without logits)")
        # A Context's logits are read in place: its lock keeps another thread's decode
        # or close off them. It is taken before the sampler's, always: a route
        # callback, which runs holding its context's lock, may use a sampler.
        held = logits._lock if isinstance(logits, Context) else contextlib.nullcontext()
        with held, self._lock:
            ptr, _keep = self._pointer(logits)
            token = ctypes.c_int32()
            _check(library().moas_sampler_sample(self._p(), ptr, ctypes.byref(token)))
            return token.value

    def reseed(self, seed):
        seed = _int("seed", seed, ctypes.c_uint64)
        with self._lock:
            library().moas_sampler_reseed(self._p(), seed)

    def accept(self, tokens):
        """Remember a token id, or each of a sequence (a prompt), for the repetition
        penalty, as if sampled; all or none."""
        if isinstance(tokens, bool):
            tokens = [tokens]   # one id, which _int refuses
        else:
            try:
                tokens = [operator.index(tokens)]   # one id (an int, a numpy integer)
            except TypeError:   # a sequence (a numpy array has __index__, and refuses)
                pass
        # all checked before any is remembered: a refused one stopped the loop with
        # those before it already in the penalty window
        tokens = [_int("token", token) for token in tokens]
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise MoasError(Status.ERR_INVALID_ARG, "sampler_accept: token %d outside "
                                "[0, %d)" % (token, self.n_vocab))
        with self._lock:
            for token in tokens:
                _check(library().moas_sampler_accept(self._p(), token))

    def reset(self):
        """Forget the tokens remembered for the repetition penalty."""
        with self._lock:
            library().moas_sampler_reset(self._p())


Perplexity = namedtuple("Perplexity", "perplexity nll n_scored n_chars n_changed")
Perplexity.__doc__ = """Model.perplexity(): exp(nll), the mean negative log-likelihood
in nats, tokens scored, characters of the text, characters replaced or dropped."""


def _numpy():
    """numpy when it is importable, else None (the ctypes layer never needs it)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _stop_bytes(stop):
    """A stop string as the C string moas_text_find_stop reads: TypeError for what is
    no text, MoasValueError for a NUL (C would match only up to it) or a lone
    surrogate (ERR_INVALID_UTF8, from _utf8)."""
    raw = _utf8(stop)
    if b"\0" in raw:
        raise MoasError(Status.ERR_INVALID_ARG, "the stop string %r contains NUL" % (stop,))
    return raw


def find_stop(text, stops, more=True):
    """(end, found) for generated text not yet shown (moas_text_find_stop): found is
    True when a stop string occurs whole, and text[:end] is what comes before it;
    otherwise text[:end] can be shown and the rest is held back while `more` text may
    follow (it may become a stop string). `text` and `stops` are str (UTF-8) or bytes;
    `end` counts characters for str, bytes for bytes."""
    raw = _utf8(text)
    if isinstance(stops, (str, bytes)):   # one stop string, not its characters
        stops = [stops]
    stop_raw = [_stop_bytes(s) for s in stops]
    arr = _array(ctypes.c_char_p, len(stop_raw))
    arr[:len(stop_raw)] = stop_raw
    end, found = ctypes.c_size_t(), ctypes.c_int32()
    _check(library().moas_text_find_stop(raw, len(raw), arr, len(stop_raw), int(bool(more)),
                                         ctypes.byref(end), ctypes.byref(found)))
    n = end.value
    if isinstance(text, str):
        n = len(raw[:n].decode("utf-8", "surrogateescape"))
    return n, bool(found.value)
