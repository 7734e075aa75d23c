#!/usr/bin/env python3
"""GGUF v3 writer and reader, standard library only.

This module owns the byte layout of GGUF files for libmoas's Python tools: the
header, the typed metadata table, the tensor directory, alignment, and the
encodings of the tensor types libmoas reads (F32, F16, BF16, Q8_0).  It knows
nothing about models; tools/moas-convert decides which keys and tensors a
libmoas model has (docs/FORMAT.md).

Shapes.  Python callers give shapes row-major, outermost first, the way PyTorch
and numpy print them: a Linear weight is (out, in).  GGUF stores dimensions
fastest-varying first ("ne"), so the writer reverses them and the reader gives
both orders (TensorInfo.shape row-major, TensorInfo.ne as stored).

Quantization follows ggml's reference quantize_row_q8_0: per block of 32
float32 values, amax = max |x|, d = amax / 127 and id = 1 / d (both in float32),
q = roundf(x * id) (float32 product, ties away from zero), and the scale is
stored as the float16 rounding of d.  An all-zero block has d = 0 and q = 0, and so
does a block so small that 1/d overflows float32 (its F16 scale is 0 either way).  A
block whose d is beyond the float16 range cannot be encoded (an error).

Run as a script to print a file's metadata and tensor directory:
    python3 tools/gguf.py model.gguf
"""

import math
import mmap
import os
import stat
import struct
import sys
from array import array
from collections import OrderedDict

__all__ = [
    "GGUFError", "GGUFWriter", "GGUFReader", "TensorInfo",
    "encode_tensor", "decode_tensor", "tensor_nbytes",
    "quantize_q8_0", "dequantize_q8_0",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 64          # what we write; GGUF's own default is 32

# Metadata value types (GGUF spec numbering).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, \
    UINT64, INT64, FLOAT64 = range(13)

VALUE_TYPE_NAMES = {
    UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16",
    UINT32: "uint32", INT32: "int32", FLOAT32: "float32", BOOL: "bool",
    STRING: "string", ARRAY: "array", UINT64: "uint64", INT64: "int64",
    FLOAT64: "float64",
}

# struct formats of the fixed-size value types
_SCALAR_FMT = {
    UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i",
    FLOAT32: "f", BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d",
}
_INT_RANGE = {
    UINT8: (0, 2**8 - 1), INT8: (-2**7, 2**7 - 1),
    UINT16: (0, 2**16 - 1), INT16: (-2**15, 2**15 - 1),
    UINT32: (0, 2**32 - 1), INT32: (-2**31, 2**31 - 1),
    UINT64: (0, 2**64 - 1), INT64: (-2**63, 2**63 - 1),
}

# Tensor types (ggml numbering).
F32, F16, Q8_0, BF16 = 0, 1, 8, 30
TENSOR_TYPE_NAMES = {F32: "F32", F16: "F16", Q8_0: "Q8_0", BF16: "BF16"}
TENSOR_TYPES_BY_NAME = {v: k for k, v in TENSOR_TYPE_NAMES.items()}
QK8_0 = 32                       # values per Q8_0 block
Q8_0_BLOCK_BYTES = 2 + QK8_0     # f16 scale + 32 int8

_LITTLE = sys.byteorder == "little"
_CHUNK = 1 << 16                 # values converted per struct call


class GGUFError(Exception):
    """A malformed GGUF file or an invalid request to the writer."""


# ---------------------------------------------------------------------------
# Element encodings
# ---------------------------------------------------------------------------

def _f32_array(values):
    """values as array('f'): every element rounded to float32."""
    if isinstance(values, array) and values.typecode == "f":
        return values
    return array("f", values)


def _le_bytes(arr):
    """The little-endian bytes of an array."""
    if not _LITTLE:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def _from_le(typecode, raw):
    arr = array(typecode)
    arr.frombytes(raw)
    if not _LITTLE:
        arr.byteswap()
    return arr


def _f16_pack_one(x):
    try:
        return struct.pack("<e", x)
    except OverflowError:       # beyond the float16 range: IEEE gives inf
        return struct.pack("<e", math.copysign(math.inf, x))


def f32_to_f16_bytes(values):
    """Float16 bytes (round to nearest even; overflow becomes +-inf)."""
    out = []
    for i in range(0, len(values), _CHUNK):
        part = values[i:i + _CHUNK]
        try:
            out.append(struct.pack("<%de" % len(part), *part))
        except OverflowError:
            out.append(b"".join(_f16_pack_one(x) for x in part))
    return b"".join(out)


def f16_bytes_to_list(raw):
    n = len(raw) // 2
    return list(struct.unpack("<%de" % n, raw[:2 * n]))


def f32_to_bf16_bytes(values):
    """Bfloat16 bytes: the top half of the float32, rounded to nearest even."""
    bits = _from_le("I", _le_bytes(_f32_array(values)))
    out = array("H")
    for u in bits:
        if (u & 0x7F800000) == 0x7F800000 and (u & 0x007FFFFF):
            out.append((u >> 16) | 0x0040)           # keep NaN a (quiet) NaN
        else:
            out.append(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)
    return _le_bytes(out)


def bf16_bytes_to_list(raw):
    half = _from_le("H", raw[:len(raw) // 2 * 2])
    bits = array("I", [h << 16 for h in half])
    return list(array("f", bits.tobytes()))


def _f32(x):
    """x rounded to float32 (round to nearest even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _round_away(p):
    """C roundf: round half away from zero."""
    if p >= 0.0:
        return int(math.floor(p + 0.5))
    return -int(math.floor(-p + 0.5))


def quantize_q8_0(values):
    """Q8_0 blocks for a sequence whose length is a multiple of 32."""
    x = _f32_array(values)
    n = len(x)
    if n % QK8_0:
        raise GGUFError("Q8_0 needs a multiple of %d values, got %d" % (QK8_0, n))
    out = bytearray(n // QK8_0 * Q8_0_BLOCK_BYTES)
    zero_q = bytes(QK8_0)
    pos = 0
    for b in range(0, n, QK8_0):
        blk = x[b:b + QK8_0]
        amax = max(max(blk), -min(blk))
        if not math.isfinite(amax):
            raise GGUFError("Q8_0 cannot encode a non-finite value")
        d = _f32(amax / 127.0)
        scale = _f16_pack_one(d)
        if math.isinf(struct.unpack("<e", scale)[0]):
            raise GGUFError("Q8_0 cannot encode the block of values %d..%d: its scale "
                            "(largest |value| %g / 127) is beyond F16's range"
                            % (b, b + QK8_0 - 1, amax))
        try:
            inv = _f32(1.0 / d) if d != 0.0 else 0.0
        except OverflowError:
            # 1/d is beyond float32 (C's would be inf) only for a d far below F16's
            # smallest step: the scale is stored as 0 and every value decodes to 0
            inv = 0.0
        if inv == 0.0:
            out[pos:pos + 2] = scale
            out[pos + 2:pos + Q8_0_BLOCK_BYTES] = zero_q
        else:
            prod = array("f", [v * inv for v in blk])      # float32 products
            q = array("b", [_round_away(p) for p in prod])
            out[pos:pos + 2] = scale
            out[pos + 2:pos + Q8_0_BLOCK_BYTES] = q.tobytes()
        pos += Q8_0_BLOCK_BYTES
    return bytes(out)


def dequantize_q8_0(raw, n):
    """n float values (as Python floats) from Q8_0 blocks."""
    if n % QK8_0 or len(raw) < n // QK8_0 * Q8_0_BLOCK_BYTES:
        raise GGUFError("Q8_0 data too short for %d values" % n)
    out = []
    for b in range(n // QK8_0):
        pos = b * Q8_0_BLOCK_BYTES
        d = struct.unpack_from("<e", raw, pos)[0]
        q = struct.unpack_from("<32b", raw, pos + 2)
        out.extend(_f32(d * v) for v in q)
    return out


def tensor_nbytes(ttype, n_elements):
    if ttype == F32:
        return 4 * n_elements
    if ttype in (F16, BF16):
        return 2 * n_elements
    if ttype == Q8_0:
        if n_elements % QK8_0:
            raise GGUFError("Q8_0 needs a multiple of %d elements" % QK8_0)
        return n_elements // QK8_0 * Q8_0_BLOCK_BYTES
    raise GGUFError("unsupported tensor type %r" % (ttype,))


def encode_tensor(values, ttype):
    """The bytes of a flat sequence of numbers stored as ttype."""
    if ttype == F32:
        return _le_bytes(_f32_array(values))
    if ttype == F16:
        return f32_to_f16_bytes(_f32_array(values))
    if ttype == BF16:
        return f32_to_bf16_bytes(values)
    if ttype == Q8_0:
        return quantize_q8_0(values)
    raise GGUFError("unsupported tensor type %r" % (ttype,))


def decode_tensor(raw, ttype, n_elements):
    """A list of n_elements Python floats decoded from raw tensor bytes."""
    need = tensor_nbytes(ttype, n_elements)
    if len(raw) < need:
        raise GGUFError("tensor data too short: %d < %d bytes" % (len(raw), need))
    raw = raw[:need]
    if ttype == F32:
        return list(_from_le("f", raw))
    if ttype == F16:
        return f16_bytes_to_list(raw)
    if ttype == BF16:
        return bf16_bytes_to_list(raw)
    return dequantize_q8_0(raw, n_elements)


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------

def _pack_string(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _real(vtype, value):
    """A float or int as the float a FLOAT32/FLOAT64 value stores; anything else (a
    string, a bool, None) is an error, not converted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GGUFError("%s value must be a number, got %r" % (VALUE_TYPE_NAMES[vtype], value))
    return float(value)


def _pack_scalar(vtype, value):
    if vtype == STRING:
        return _pack_string(value)
    if vtype in _INT_RANGE:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError("%s value must be an int, got %r" % (VALUE_TYPE_NAMES[vtype], value))
        lo, hi = _INT_RANGE[vtype]
        if not lo <= value <= hi:
            raise GGUFError("%d does not fit in %s" % (value, VALUE_TYPE_NAMES[vtype]))
    elif vtype == BOOL:
        if not isinstance(value, bool):
            raise GGUFError("bool value must be True or False, got %r" % (value,))
    elif vtype in (FLOAT32, FLOAT64):
        value = _real(vtype, value)
    else:
        raise GGUFError("unknown value type %r" % (vtype,))
    return struct.pack("<" + _SCALAR_FMT[vtype], value)


def _pack_value(vtype, value, elem_type=None):
    """Bytes of one metadata value, without its leading type tag.

    For ARRAY, value is a sequence and elem_type the type of its elements; an
    element of an array of arrays is itself a pair (elem_type, sequence).
    """
    if vtype != ARRAY:
        return _pack_scalar(vtype, value)
    if elem_type is None:
        raise GGUFError("array needs an element type")
    parts = [struct.pack("<IQ", elem_type, len(value))]
    if elem_type == ARRAY:
        for sub in value:
            sub_type, sub_values = sub
            parts.append(_pack_value(ARRAY, sub_values, sub_type))
    elif elem_type in _SCALAR_FMT and elem_type not in _INT_RANGE and elem_type != BOOL:
        parts.append(struct.pack("<%d%s" % (len(value), _SCALAR_FMT[elem_type]),
                                 *[_real(elem_type, v) for v in value]))
    else:
        parts.extend(_pack_scalar(elem_type, v) for v in value)
    return b"".join(parts)


def _guess_type(value):
    if isinstance(value, bool):
        return BOOL, None
    if isinstance(value, int):
        if 0 <= value < 2**32:
            return UINT32, None
        if -2**31 <= value < 2**31:
            return INT32, None
        return (UINT64 if value >= 0 else INT64), None
    if isinstance(value, float):
        return FLOAT32, None
    if isinstance(value, str):
        return STRING, None
    if isinstance(value, (list, tuple)):
        if not value:
            raise GGUFError("cannot guess the element type of an empty array")
        elem, _ = _guess_type(value[0])
        if elem in (UINT32, INT32) and all(isinstance(v, int) for v in value):
            elem = UINT32 if min(value) >= 0 and max(value) < 2**32 else INT64
        return ARRAY, elem
    raise GGUFError("cannot store %r as GGUF metadata" % (value,))


class _PendingTensor:
    __slots__ = ("name", "ne", "ttype", "nbytes", "produce")

    def __init__(self, name, ne, ttype, nbytes, produce):
        self.name, self.ne, self.ttype = name, ne, ttype
        self.nbytes, self.produce = nbytes, produce


class GGUFWriter:
    """Collects metadata and tensors, then writes one GGUF v3 file.

        w = GGUFWriter()                       # alignment 64
        w.add_string("general.architecture", "moas")
        w.add_array("tokenizer.ggml.tokens", STRING, ["a", "b"])
        w.add_tensor("token_embd.weight", values, (n_vocab, n_embd), F16)
        w.write("model.gguf")

    `general.alignment` is written first unless write_alignment_key is false
    (then the alignment must be GGUF's default 32, which readers assume without
    the key: another is refused).
    """

    def __init__(self, alignment=DEFAULT_ALIGNMENT, write_alignment_key=True):
        if alignment < 1 or alignment & (alignment - 1):
            raise GGUFError("alignment must be a power of two, got %r" % (alignment,))
        if not write_alignment_key and alignment != 32:
            # readers would place the data section and every tensor 32-aligned
            raise GGUFError("alignment %d needs the general.alignment key (without it "
                            "readers assume 32)" % alignment)
        self.alignment = alignment
        self._kv = OrderedDict()          # key -> (vtype, value, elem_type)
        self._tensors = OrderedDict()     # name -> _PendingTensor
        if write_alignment_key:
            self.add_uint32("general.alignment", alignment)

    # -- metadata ---------------------------------------------------------
    def add_kv(self, key, vtype, value, elem_type=None):
        if key in self._kv:
            raise GGUFError("duplicate metadata key %r" % key)
        _pack_value(vtype, value, elem_type)     # validate now, not at write
        self._kv[key] = (vtype, value, elem_type)

    def add(self, key, value):
        """Add a value with a type guessed from the Python type."""
        vtype, elem = _guess_type(value)
        self.add_kv(key, vtype, value, elem)

    def add_uint8(self, key, v): self.add_kv(key, UINT8, v)
    def add_int8(self, key, v): self.add_kv(key, INT8, v)
    def add_uint16(self, key, v): self.add_kv(key, UINT16, v)
    def add_int16(self, key, v): self.add_kv(key, INT16, v)
    def add_uint32(self, key, v): self.add_kv(key, UINT32, v)
    def add_int32(self, key, v): self.add_kv(key, INT32, v)
    def add_uint64(self, key, v): self.add_kv(key, UINT64, v)
    def add_int64(self, key, v): self.add_kv(key, INT64, v)
    def add_float32(self, key, v): self.add_kv(key, FLOAT32, v)
    def add_float64(self, key, v): self.add_kv(key, FLOAT64, v)
    def add_bool(self, key, v): self.add_kv(key, BOOL, v)
    def add_string(self, key, v): self.add_kv(key, STRING, v)

    def add_array(self, key, elem_type, values):
        self.add_kv(key, ARRAY, list(values), elem_type)

    # -- tensors ----------------------------------------------------------
    def add_tensor(self, name, values, shape, ttype=F32):
        """A tensor from a flat row-major sequence (or a callable returning
        one, called at write time) and its row-major shape."""
        shape = tuple(int(s) for s in shape)
        if not 1 <= len(shape) <= 4 or min(shape) < 1:
            raise GGUFError("tensor %r: shape %r needs 1 to 4 dims, each >= 1" % (name, shape))
        n = 1
        for s in shape:
            n *= s
        ne = tuple(reversed(shape))
        if ttype == Q8_0 and ne[0] % QK8_0:
            raise GGUFError("tensor %r: Q8_0 rows must be a multiple of %d, got %d"
                            % (name, QK8_0, ne[0]))
        nbytes = tensor_nbytes(ttype, n)
        if not callable(values) and len(values) != n:
            raise GGUFError("tensor %r: %d values for shape %r" % (name, len(values), shape))

        def produce():
            vals = values() if callable(values) else values
            if len(vals) != n:
                raise GGUFError("tensor %r: %d values for shape %r" % (name, len(vals), shape))
            try:
                return encode_tensor(vals, ttype)
            except GGUFError as e:
                raise GGUFError("tensor %r: %s" % (name, e)) from None
        self._add_pending(_PendingTensor(name, ne, ttype, nbytes, produce))

    def add_tensor_raw(self, name, ne, ttype, data):
        """A tensor from already encoded bytes; ne is fastest-first. No
        consistency checks: meant for building test files."""
        data = bytes(data)
        self._add_pending(_PendingTensor(name, tuple(ne), ttype, len(data), lambda: data))

    def _add_pending(self, t):
        if t.name in self._tensors:
            raise GGUFError("duplicate tensor name %r" % t.name)
        self._tensors[t.name] = t

    # -- output -----------------------------------------------------------
    def _pad(self, n):
        return (-n) % self.alignment

    def write(self, dest):
        """Write to a path or a binary file object."""
        if hasattr(dest, "write"):
            self._write_to(dest)
        else:
            with open(dest, "wb") as f:
                self._write_to(f)

    def to_bytes(self):
        import io
        buf = io.BytesIO()
        self._write_to(buf)
        return buf.getvalue()

    def _write_to(self, f):
        head = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        for key, (vtype, value, elem) in self._kv.items():
            head.append(_pack_string(key))
            head.append(struct.pack("<I", vtype))
            head.append(_pack_value(vtype, value, elem))
        offset = 0
        for t in self._tensors.values():
            head.append(_pack_string(t.name))
            head.append(struct.pack("<I", len(t.ne)))
            head.append(struct.pack("<%dQ" % len(t.ne), *t.ne))
            head.append(struct.pack("<IQ", t.ttype, offset))
            offset += t.nbytes + self._pad(t.nbytes)
        head = b"".join(head)
        f.write(head)
        f.write(bytes(self._pad(len(head))))
        for t in self._tensors.values():
            data = t.produce()
            if len(data) != t.nbytes:
                raise GGUFError("tensor %r: produced %d bytes, expected %d"
                                % (t.name, len(data), t.nbytes))
            f.write(data)
            f.write(bytes(self._pad(t.nbytes)))


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------

class TensorInfo:
    __slots__ = ("name", "ne", "shape", "ttype", "offset", "nbytes", "n_elements")

    def __init__(self, name, ne, ttype, offset, nbytes):
        self.name, self.ne, self.ttype = name, tuple(ne), ttype
        self.shape = tuple(reversed(self.ne))
        self.offset, self.nbytes = offset, nbytes       # offset: from file start
        n = 1
        for d in self.ne:
            n *= d
        self.n_elements = n

    @property
    def type_name(self):
        return TENSOR_TYPE_NAMES.get(self.ttype, str(self.ttype))

    def __repr__(self):
        return "TensorInfo(%r, shape=%r, %s)" % (self.name, self.shape, self.type_name)


class GGUFReader:
    """Parses a GGUF v3 file (a path or bytes) with bounds checks. A path is mapped,
    not read: the file must not be truncated or rewritten while the reader is used.

    kv:        OrderedDict key -> Python value (arrays as lists)
    kv_types:  key -> (vtype, elem_type or None)
    tensors:   OrderedDict name -> TensorInfo
    """

    MAX_STRING = 1 << 30
    MAX_COUNT = 1 << 32

    def __init__(self, source):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data = bytes(source)
        else:
            with open(source, "rb") as f:
                # mapped, not read: a device or pipe (/dev/zero) would never end
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise GGUFError("'%s' is not a regular file" % source)
                # only the pages parsed or asked for are read (a 247 MB model's
                # header in a fraction of the time and memory of reading it whole)
                self.data = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                             if st.st_size > 0 else b"")
        self._pos = 0
        self.kv = OrderedDict()
        self.kv_types = {}
        self.tensors = OrderedDict()
        self._parse()

    # -- primitive reads --------------------------------------------------
    def _take(self, n):
        if n < 0 or self._pos + n > len(self.data):
            raise GGUFError("unexpected end of file at byte %d (need %d more)" % (self._pos, n))
        b = self.data[self._pos:self._pos + n]
        self._pos += n
        return b

    def _unpack(self, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))

    def _string(self):
        (n,) = self._unpack("<Q")
        if n > self.MAX_STRING:
            raise GGUFError("string length %d too large at byte %d" % (n, self._pos - 8))
        try:
            return self._take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError("string at byte %d is not valid UTF-8" % self._pos)

    def _value(self, vtype, depth=0):
        if vtype == STRING:
            return self._string(), None
        if vtype in _SCALAR_FMT:
            v = self._unpack("<" + _SCALAR_FMT[vtype])[0]
            return v, None
        if vtype == ARRAY:
            if depth > 8:
                raise GGUFError("arrays nested too deeply")
            elem, n = self._unpack("<IQ")
            if n > self.MAX_COUNT:
                raise GGUFError("array length %d too large" % n)
            if elem in _SCALAR_FMT:
                fmt = "<%d%s" % (n, _SCALAR_FMT[elem])
                return list(self._unpack(fmt)), elem
            if elem == STRING:
                return [self._string() for _ in range(n)], elem
            if elem == ARRAY:      # each element as (elem_type, values), like the writer
                subs = [self._value(ARRAY, depth + 1) for _ in range(n)]
                return [(sub_elem, sub) for sub, sub_elem in subs], elem
            raise GGUFError("unknown array element type %d" % elem)
        raise GGUFError("unknown metadata value type %d" % vtype)

    # -- structure --------------------------------------------------------
    def _parse(self):
        if self._take(4) != GGUF_MAGIC:
            raise GGUFError("not a GGUF file (bad magic)")
        self.version, n_tensors, n_kv = self._unpack("<IQQ")
        if self.version != GGUF_VERSION:
            raise GGUFError("unsupported GGUF version %d" % self.version)
        if n_kv > self.MAX_COUNT or n_tensors > self.MAX_COUNT:
            raise GGUFError("implausible counts: %d keys, %d tensors" % (n_kv, n_tensors))
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            value, elem = self._value(vtype)
            if key in self.kv:
                raise GGUFError("duplicate key %r" % key)
            self.kv[key] = value
            self.kv_types[key] = (vtype, elem)
        self.alignment = 32
        if "general.alignment" in self.kv:
            a = self.kv["general.alignment"]
            if self.kv_types["general.alignment"][0] != UINT32 or a < 1 or a & (a - 1):
                raise GGUFError("general.alignment must be a uint32 power of two, got %r" % (a,))
            self.alignment = a
        infos = []
        seen = set()
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if not 1 <= n_dims <= 4:
                raise GGUFError("tensor %r has %d dims" % (name, n_dims))
            ne = self._unpack("<%dQ" % n_dims)
            if min(ne) < 1:
                raise GGUFError("tensor %r has a zero dimension" % name)
            ttype, offset = self._unpack("<IQ")
            if ttype not in TENSOR_TYPE_NAMES:
                raise GGUFError("tensor %r has unsupported type %d" % (name, ttype))
            if name in seen:
                raise GGUFError("duplicate tensor %r" % name)
            seen.add(name)
            if offset % self.alignment:
                raise GGUFError("tensor %r offset %d not aligned" % (name, offset))
            n = 1
            for d in ne:
                n *= d
            if ttype == Q8_0 and ne[0] % QK8_0:
                raise GGUFError("tensor %r: Q8_0 row of %d elements" % (name, ne[0]))
            infos.append((name, ne, ttype, offset, tensor_nbytes(ttype, n)))
        self.data_offset = self._pos + (-self._pos) % self.alignment
        spans = []
        for name, ne, ttype, offset, nbytes in infos:
            start = self.data_offset + offset
            if start + nbytes > len(self.data):
                raise GGUFError("tensor %r extends past the end of the file" % name)
            spans.append((offset, offset + nbytes, name))
            self.tensors[name] = TensorInfo(name, ne, ttype, start, nbytes)
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GGUFError("tensors %r and %r overlap" % (an, bn))

    # -- access -----------------------------------------------------------
    def tensor_raw(self, name):
        t = self.tensors[name]
        return self.data[t.offset:t.offset + t.nbytes]

    def tensor_values(self, name):
        """The tensor's elements as a flat row-major list of floats."""
        t = self.tensors[name]
        return decode_tensor(self.tensor_raw(name), t.ttype, t.n_elements)


# ---------------------------------------------------------------------------

def _describe(path):
    r = GGUFReader(path)
    print("%s: GGUF v%d, %d keys, %d tensors, alignment %d"
          % (path, r.version, len(r.kv), len(r.tensors), r.alignment))
    for key, value in r.kv.items():
        vtype, elem = r.kv_types[key]
        tname = VALUE_TYPE_NAMES.get(vtype, "?")
        if vtype == ARRAY:
            tname = "array[%s]" % VALUE_TYPE_NAMES.get(elem, "?")
            shown = value if len(value) <= 16 else "%r ... (%d items)" % (value[:16], len(value))
        else:
            shown = value
        print("  %-40s %-14s %s" % (key, tname, shown if isinstance(shown, str) else repr(shown)))
    for t in r.tensors.values():
        print("  %-40s %-5s ne=%-20s offset=%d" % (t.name, t.type_name, list(t.ne), t.offset))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: gguf.py FILE.gguf\n")
        sys.exit(2)
    try:
        _describe(sys.argv[1])
    except (GGUFError, OSError) as e:
        sys.stderr.write("gguf.py: %s\n" % e)
        sys.exit(1)
