# cython: language_level=3
"""The protobuf wire format of ``CalculateReceipt``, by hand: request bytes straight to the core's dicts and
the core's answer dict straight to response bytes, with no ``loyalty.v1`` message in between.

Building the receipt dict from a upb message costs several times what the core costs on a 20-line receipt
(every field read crosses from upb into Python), and so does building the answer message; this module
does both in one pass over C bytes. It is the edge of the ``CalculateReceipt`` handler only:

- ``decode_calculate_request(data)`` returns ``(card, phone, receipt)`` where ``receipt`` is exactly
  ``convert.receipt_to_dict(request.receipt)`` and ``card`` / ``phone`` are ``request.member.card`` /
  ``.phone``. It reads the way protobuf's parser (upb) does: fields of a message that occurs twice are
  merged (last scalar wins, repeated fields concatenate), a known field with an unexpected wire type is an
  unknown field, unknown fields (groups included) are skipped. Bytes upb refuses are refused here as
  ``ValueError``: a truncated varint, tag or field, a length past the end of its message, a varint longer
  than 10 bytes, a tag longer than 5 bytes or beyond 32 bits, field number 0 (outside unknown groups, where
  upb lets it pass), wire types 6 and 7, an end group without its start, groups nested deeper than upb's
  limit of 100 (messages and groups together), invalid UTF-8 in a string.
- ``encode_calculate_response(answer, program_version)`` returns the very bytes
  ``CalculateReceiptResponse(answer=convert.answer_to_proto(answer)).SerializeToString()`` gives (proto3:
  zero and empty fields left out; ``totals`` and a given ``member`` always present; ``to_next_tier``
  present whenever it is not None, zero included).

The schema is proto/loyalty/v1/receipt.proto and processing.proto; a field added there must be added here
(tests/test_wire.py compares both directions with protobuf itself on generated receipts and answers).
The output is written into a stack buffer and moves to the heap only when it outgrows it.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memmove

from loyalty.server import limits

cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    bint PyUnicode_Check(object o)
    bint PyLong_Check(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1

__all__ = ["decode_calculate_request", "encode_calculate_response"]

cdef enum WireType:
    VARINT = 0
    I64 = 1
    LEN = 2
    SGROUP = 3
    EGROUP = 4
    I32 = 5

cdef enum:
    MAX_GROUP_DEPTH = 100   # upb's default nesting limit (the Python runtime's recursion limit)
    STACK_BUFFER = 4096     # a 20-line answer is about 600 bytes


# ---- reading ---------------------------------------------------------------------------------------------------

cdef struct Reader:
    const unsigned char* p
    const unsigned char* end
    const unsigned char* base      # start of the whole request, for the offset in error messages


cdef int _malformed(Reader* r, str what) except -1:
    raise ValueError(f"not a valid loyalty.v1.CalculateReceiptRequest: {what} at byte {r.p - r.base}")


cdef inline int _varint(Reader* r, uint64_t* out) except -1:
    """A base-128 varint of at most 10 bytes; bits beyond the 64th are dropped, as upb does."""
    cdef uint64_t value = 0
    cdef unsigned char byte
    cdef int i
    for i in range(10):
        if r.p >= r.end:
            return _malformed(r, "truncated varint")
        byte = r.p[0]
        r.p += 1
        value |= (<uint64_t>(byte & 0x7F)) << (7 * i)
        if byte < 0x80:
            out[0] = value
            return 0
    return _malformed(r, "varint longer than 10 bytes")


cdef inline int _short_varint(Reader* r, uint64_t* out, const char* what) except -1:
    """Tags and lengths: at most 5 bytes (upb's limit)."""
    cdef uint64_t value = 0
    cdef unsigned char byte
    cdef int i
    for i in range(5):
        if r.p >= r.end:
            return _malformed(r, f"truncated {what.decode()}")
        byte = r.p[0]
        r.p += 1
        value |= (<uint64_t>(byte & 0x7F)) << (7 * i)
        if byte < 0x80:
            out[0] = value
            return 0
    return _malformed(r, f"{what.decode()} longer than 5 bytes")


cdef inline int _tag(Reader* r, uint32_t* field, int* wire_type, bint in_group=False) except -1:
    """A field's tag. Field number 0 is refused, except inside an unknown group, which upb skips without
    looking at the numbers (only at the wire types and its end)."""
    cdef uint64_t tag = 0
    if r.p < r.end and r.p[0] < 0x80:        # every field of these messages has a one-byte tag
        tag = r.p[0]
        r.p += 1
    else:
        _short_varint(r, &tag, b"tag")
        if tag > 0xFFFFFFFF:
            return _malformed(r, "tag beyond 32 bits")
    field[0] = <uint32_t>(tag >> 3)
    wire_type[0] = <int>(tag & 7)
    if field[0] == 0 and not in_group:
        return _malformed(r, "field number 0")
    return 0


cdef inline int _length(Reader* r, Py_ssize_t* out) except -1:
    cdef uint64_t n = 0
    if r.p < r.end and r.p[0] < 0x80:
        n = r.p[0]
        r.p += 1
    else:
        _short_varint(r, &n, b"length")
    if n > <uint64_t>(r.end - r.p):
        return _malformed(r, "length past the end of the message")
    out[0] = <Py_ssize_t>n
    return 0


cdef inline int _sub(Reader* r, Reader* sub) except -1:
    """``sub`` spans the length-delimited field at ``r``; ``r`` moves past it."""
    cdef Py_ssize_t n = 0
    _length(r, &n)
    sub.p = r.p
    sub.end = r.p + n
    sub.base = r.base
    r.p += n
    return 0


cdef inline str _string(Reader* r):
    cdef Py_ssize_t n = 0
    _length(r, &n)
    return _text(r, n)


cdef inline str _text(Reader* r, Py_ssize_t n):
    """The ``n`` bytes at ``r.p`` (within the message: ``_length`` checked) as a str; ``r.p`` moves past them."""
    cdef const unsigned char* start = r.p
    r.p += n
    try:
        return PyUnicode_DecodeUTF8(<const char*>start, n, NULL)
    except UnicodeDecodeError:
        r.p = start
        _malformed(r, "invalid UTF-8 in a string field")


# The longest strings (in UTF-8 bytes; a str of that many bytes has at most that many characters) that
# processing._check_receipt lets through, read once from ``limits`` into C; NO_LIMIT: any length, only no NUL.
cdef Py_ssize_t ID_LIMIT = limits.ID_LIMIT       # store, terminal, number, sku
cdef Py_ssize_t AT_LIMIT = limits.AT_LIMIT
cdef Py_ssize_t CODE_LIMIT = limits.CODE_LIMIT   # channel, coupon codes, categories
cdef Py_ssize_t MAX_COUPONS = limits.MAX_COUPONS
cdef Py_ssize_t MAX_CATEGORIES = limits.MAX_CATEGORIES
cdef enum:
    NO_LIMIT = -1


cdef inline str _fitting_string(Reader* r, Py_ssize_t limit, bint* fits):
    """``_string``, clearing ``fits`` when the bytes hold a NUL or are longer than ``limit``."""
    cdef Py_ssize_t n = 0
    _length(r, &n)
    if (limit >= 0 and n > limit) or memchr(r.p, 0, n) != NULL:
        fits[0] = False
    return _text(r, n)


cdef int _skip(Reader* r, uint32_t field, int wire_type, int depth) except -1:
    """Skip an unknown field whose tag has just been read (a group up to its matching end). ``depth`` is how
    deep the field is (the request is 0, its member and receipt 1, a line 2, each group one more): upb
    counts messages and groups against one limit."""
    cdef uint64_t ignored = 0
    cdef Py_ssize_t n = 0
    cdef uint32_t inner
    cdef int inner_type
    if wire_type == VARINT:
        _varint(r, &ignored)
    elif wire_type == I64:
        if r.end - r.p < 8:
            return _malformed(r, "truncated fixed64")
        r.p += 8
    elif wire_type == LEN:
        _length(r, &n)
        r.p += n
    elif wire_type == I32:
        if r.end - r.p < 4:
            return _malformed(r, "truncated fixed32")
        r.p += 4
    elif wire_type == SGROUP:
        if depth >= MAX_GROUP_DEPTH:
            return _malformed(r, "groups nested too deep")
        while True:
            if r.p >= r.end:
                return _malformed(r, "group without its end")
            _tag(r, &inner, &inner_type, True)
            if inner_type == EGROUP:
                if inner != field:
                    return _malformed(r, "end of a group that was not started")
                return 0
            _skip(r, inner, inner_type, depth + 1)
    elif wire_type == EGROUP:
        return _malformed(r, "end of a group that was not started")
    else:
        return _malformed(r, f"wire type {wire_type}")
    return 0


@cython.final
cdef class _Receipt:
    """A ``Receipt`` being read; proto3 merges every occurrence of the field into one message."""
    cdef str store, terminal, number, channel, at
    cdef list coupons, lines
    cdef int64_t redeem_points
    cdef bint fits      # every string within what storage takes (see decode_receipt_request)

    def __cinit__(self):
        self.store = self.terminal = self.number = self.channel = self.at = ""
        self.coupons = []
        self.lines = []
        self.redeem_points = 0
        self.fits = True

    cdef dict as_dict(self):
        """``convert.receipt_to_dict``'s dict, key for key."""
        cdef dict out = {"store": self.store, "terminal": self.terminal, "number": self.number,
                         "coupons": self.coupons, "redeem_points": self.redeem_points, "lines": self.lines}
        if self.channel:
            out["channel"] = self.channel
        if self.at:
            out["at"] = self.at
        return out


cdef dict _line(Reader* r, bint* fits):
    cdef str sku = ""
    cdef list categories = None
    cdef int64_t quantity = 0, price = 0, amount = 0, external_discount = 0, min_price = 0
    cdef bint has_amount = False, no_discount = False, no_accrual = False, no_redeem = False
    cdef uint32_t field
    cdef int wire_type
    cdef uint64_t v = 0
    while r.p < r.end:
        _tag(r, &field, &wire_type)
        if wire_type == LEN:
            if field == 1:
                sku = _fitting_string(r, ID_LIMIT, fits)
                continue
            if field == 2:
                if categories is None:
                    categories = []
                categories.append(_fitting_string(r, CODE_LIMIT, fits))
                continue
        elif wire_type == VARINT and 3 <= field <= 10:
            _varint(r, &v)
            if field == 3:
                quantity = <int64_t>v
            elif field == 4:
                price = <int64_t>v
            elif field == 5:
                amount = <int64_t>v
                has_amount = True
            elif field == 6:
                external_discount = <int64_t>v
            elif field == 7:
                min_price = <int64_t>v
            elif field == 8:
                no_discount = v != 0
            elif field == 9:
                no_accrual = v != 0
            else:
                no_redeem = v != 0
            continue
        _skip(r, field, wire_type, 2)
    cdef dict d = {"sku": sku, "quantity": quantity, "price": price, "external_discount": external_discount,
                   "min_price": min_price, "no_discount": no_discount, "no_accrual": no_accrual,
                   "no_redeem": no_redeem}
    if categories:
        d["categories"] = categories
        if len(categories) > MAX_CATEGORIES:
            fits[0] = False
    if has_amount:
        d["amount"] = amount
    return d


cdef int _receipt(Reader* r, _Receipt acc) except -1:
    cdef uint32_t field
    cdef int wire_type
    cdef uint64_t v = 0
    cdef Reader sub
    while r.p < r.end:
        _tag(r, &field, &wire_type)
        if wire_type == LEN and field <= 8 and field != 7:
            if field == 8:
                _sub(r, &sub)
                acc.lines.append(_line(&sub, &acc.fits))
            elif field == 1:
                acc.store = _fitting_string(r, ID_LIMIT, &acc.fits)
            elif field == 2:
                acc.terminal = _fitting_string(r, ID_LIMIT, &acc.fits)
            elif field == 3:
                acc.number = _fitting_string(r, ID_LIMIT, &acc.fits)
            elif field == 4:
                acc.channel = _fitting_string(r, CODE_LIMIT, &acc.fits)
            elif field == 5:
                acc.at = _fitting_string(r, AT_LIMIT, &acc.fits)
            else:
                acc.coupons.append(_fitting_string(r, CODE_LIMIT, &acc.fits))
        elif wire_type == VARINT and field == 7:
            _varint(r, &v)
            acc.redeem_points = <int64_t>v
        else:
            _skip(r, field, wire_type, 1)
    if len(acc.coupons) > MAX_COUPONS:
        acc.fits = False
    return 0


def decode_calculate_request(bytes data not None):
    """``(card, phone, receipt)`` of a serialized ``CalculateReceiptRequest``; ``ValueError`` when the bytes
    are not one."""
    card, phone, receipt, _fits = decode_receipt_request(data)
    return card, phone, receipt


def decode_receipt_request(bytes data not None):
    """``decode_calculate_request``'s three values and ``fits``: True when every string of the receipt is
    within what ``processing._check_receipt`` lets through (no NUL; store, terminal, number and skus at most
    64 UTF-8 bytes, ``at`` at most 40), so that the service need not check them again. False says only that
    the service must check (a 40-character Cyrillic sku is 80 bytes and still fits)."""
    cdef Reader r, sub
    r.base = r.p = <const unsigned char*>PyBytes_AS_STRING(data)
    r.end = r.p + PyBytes_GET_SIZE(data)
    cdef str card = "", phone = ""
    cdef _Receipt receipt = _Receipt()
    cdef uint32_t field, inner
    cdef int wire_type, inner_type
    while r.p < r.end:
        _tag(&r, &field, &wire_type)
        if wire_type == LEN and field == 2:
            _sub(&r, &sub)
            _receipt(&sub, receipt)
        elif wire_type == LEN and field == 1:
            _sub(&r, &sub)
            while sub.p < sub.end:
                _tag(&sub, &inner, &inner_type)
                if inner_type == LEN and inner == 1:
                    card = _string(&sub)
                elif inner_type == LEN and inner == 2:
                    phone = _string(&sub)
                else:
                    _skip(&sub, inner, inner_type, 1)
        else:
            _skip(&r, field, wire_type, 0)
    return card, phone, receipt.as_dict(), receipt.fits


# ---- writing ---------------------------------------------------------------------------------------------------

cdef struct Writer:
    unsigned char* buf
    Py_ssize_t n
    Py_ssize_t cap
    unsigned char* stack           # the caller's stack buffer: ``buf`` is on the heap when it differs


cdef int _grow(Writer* w, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = w.cap * 2
    if cap < w.n + need:
        cap = w.n + need
    cdef unsigned char* buf
    if w.buf == w.stack:
        buf = <unsigned char*>PyMem_Malloc(cap)
        if buf != NULL:
            memcpy(buf, w.buf, w.n)
    else:
        buf = <unsigned char*>PyMem_Realloc(w.buf, cap)
    if buf == NULL:
        raise MemoryError()
    w.buf = buf
    w.cap = cap
    return 0


cdef inline int _reserve(Writer* w, Py_ssize_t need) except -1:
    if w.n + need > w.cap:
        _grow(w, need)
    return 0


cdef inline Py_ssize_t _put_varint_at(unsigned char* p, uint64_t v) noexcept:
    cdef Py_ssize_t i = 0
    while v >= 0x80:
        p[i] = <unsigned char>(v | 0x80)
        v >>= 7
        i += 1
    p[i] = <unsigned char>v
    return i + 1


cdef inline int _put_key(Writer* w, int field, int wire_type, uint64_t v) except -1:
    """A one-byte tag (every field here is numbered below 16) and a varint."""
    _reserve(w, 11)
    w.buf[w.n] = <unsigned char>((field << 3) | wire_type)
    w.n += 1 + _put_varint_at(w.buf + w.n + 1, v)
    return 0


cdef inline int64_t _int64(object value) except? -1:
    cdef int overflow = 0
    if not PyLong_Check(value):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise ValueError(f"{value} is out of the int64 range")
    return v


cdef inline int _put_int(Writer* w, int field, object value) except -1:
    if value is None:              # as in a message constructor: None leaves the field unset
        return 0
    cdef int64_t v = _int64(value)
    if v != 0:
        _put_key(w, field, VARINT, <uint64_t>v)
    return 0


cdef inline int _put_str(Writer* w, int field, object value) except -1:
    cdef Py_ssize_t n = 0
    if value is None:
        return 0
    if not PyUnicode_Check(value):
        raise TypeError(f"expected a str, got {type(value).__name__}")
    cdef const char* s = PyUnicode_AsUTF8AndSize(value, &n)
    if n:
        _put_key(w, field, LEN, <uint64_t>n)
        _reserve(w, n)
        memcpy(w.buf + w.n, s, n)
        w.n += n
    return 0


cdef inline Py_ssize_t _begin(Writer* w, int field) except -1:
    """Open a length-delimited field: its tag and one byte for the length, fixed up by ``_end``."""
    _reserve(w, 2)
    w.buf[w.n] = <unsigned char>((field << 3) | LEN)
    w.n += 2
    return w.n - 1


cdef inline int _end(Writer* w, Py_ssize_t at) except -1:
    cdef Py_ssize_t size = w.n - at - 1
    cdef unsigned char tmp[10]
    cdef Py_ssize_t k
    if size < 0x80:
        w.buf[at] = <unsigned char>size
        return 0
    k = _put_varint_at(tmp, <uint64_t>size)
    _reserve(w, k - 1)
    memmove(w.buf + at + k, w.buf + at + 1, size)
    memcpy(w.buf + at, tmp, k)
    w.n += k - 1
    return 0


cdef int _answer(Writer* w, dict answer, object program_version) except -1:
    cdef dict ln, d, t, h, m
    cdef Py_ssize_t at, at_d
    cdef object x
    for x in answer["lines"]:
        ln = x
        at = _begin(w, 1)
        _put_str(w, 1, ln["sku"])
        _put_int(w, 2, ln["amount"])
        _put_int(w, 3, ln.get("external_discount", 0))
        for x in ln.get("discounts", ()):
            d = x
            at_d = _begin(w, 4)
            _put_str(w, 1, d["promotion"])
            _put_int(w, 2, d["amount"])
            _end(w, at_d)
        _put_int(w, 5, ln["payable"])
        _put_int(w, 6, ln["redeemed"])
        _put_int(w, 7, ln["points"])
        _end(w, at)
    t = answer["totals"]
    at = _begin(w, 2)
    _put_int(w, 1, t["amount"])
    _put_int(w, 2, t.get("external_discount", 0))
    _put_int(w, 3, t["discount"])
    _put_int(w, 4, t["payable"])
    _put_int(w, 5, t["max_points"])
    _put_int(w, 6, t["redeemed_points"])
    _put_int(w, 7, t["redeemed_amount"])
    _put_int(w, 8, t["accrued_points"])
    _end(w, at)
    x = answer.get("promotions", ())
    for x in (x if x is not None else ()):
        _put_str(w, 3, x)
    for x in answer.get("hints", ()):
        h = x
        at = _begin(w, 4)
        _put_str(w, 1, h["promotion"])
        _put_str(w, 2, h["condition"])
        _put_int(w, 3, h["missing"])
        _put_str(w, 4, h["message"])
        _end(w, at)
    x = answer.get("messages", ())
    for x in (x if x is not None else ()):
        _put_str(w, 5, x)
    m = answer.get("member")
    if m:
        at = _begin(w, 6)
        # answer_to_proto's ``m.get(key) or default``: None (and any falsy value) is the proto default
        x = m.get("card")
        if x:
            _put_str(w, 1, x)
        x = m.get("status")
        if x:
            _put_str(w, 2, x)
        x = m.get("tier")
        if x:
            _put_str(w, 3, x)
        if m.get("anonymous"):
            _put_key(w, 4, VARINT, 1)
        for field, key in ((5, "active_before"), (6, "active_after"), (7, "pending_before"),
                           (8, "pending_after")):
            x = m.get(key)
            if x:
                _put_int(w, field, x)
        x = m.get("next_tier")
        if x:
            _put_str(w, 9, x)
        x = m.get("to_next_tier")
        if x is not None:          # optional: present even when zero
            _put_key(w, 10, VARINT, <uint64_t>_int64(x))
        _end(w, at)
    _put_int(w, 7, program_version)
    return 0


cdef bytes _response(str purchase_id, dict answer, object program_version, int answer_field, bint replayed):
    """A response message: ``purchase_id`` as field 1 (when given), the answer as ``answer_field``, then
    ``replayed`` as field 3 (when true). Written to a stack buffer, moved to the heap only past its size."""
    cdef unsigned char stack[STACK_BUFFER]
    cdef Writer w
    w.buf = w.stack = stack
    w.n = 0
    w.cap = STACK_BUFFER
    cdef Py_ssize_t at
    try:
        if purchase_id is not None:
            _put_str(&w, 1, purchase_id)
        at = _begin(&w, answer_field)
        _answer(&w, answer, program_version)
        _end(&w, at)
        if replayed:
            _put_key(&w, 3, VARINT, 1)
        return PyBytes_FromStringAndSize(<char*>w.buf, w.n)
    finally:
        if w.buf != w.stack:
            PyMem_Free(w.buf)


def encode_calculate_response(dict answer not None, program_version):
    """The serialized ``CalculateReceiptResponse`` of the core's ``answer`` dict (docs/ENGINE.md "Answer")
    under program version ``program_version``."""
    return _response(None, answer, program_version, 1, False)


def encode_confirm_response(str purchase_id not None, dict answer not None, bint replayed):
    """The serialized ``ConfirmPurchaseResponse``: ``purchase_id``, the ``answer`` dict (its own
    ``program_version``, as stored with the purchase) and ``replayed``."""
    return _response(purchase_id, answer, answer.get("program_version", 0), 2, replayed)
