# cython: language_level=3
"""The compiled receipt core: docs/ENGINE.md on C structs and C integers.

``Engine(program)`` compiles a validated ``model.Program`` once into an immutable snapshot of C arrays
(declared in _engine.pxd); ``calculate`` decodes the request dicts on a fast path, runs the steps of SPEC
section 4 without Python objects per line, and builds the answer dict. Any anomaly in the request sends it
to ``loyalty.core.inputs.parse_request``, so errors are the reference's, word for word. Nothing here is
mutable after ``__init__``: many threads may share one Engine (the arithmetic runs without the GIL on
large receipts).
"""
cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF, PyObject
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memset

include "_engine.pxd"

from loyalty.core.errors import InputError
from loyalty.core import inputs as _inputs

__all__ = ["Engine"]

cdef extern from "Python.h":
    PyObject* dget "PyDict_GetItemWithError"(PyObject* d, PyObject* k)   # no error state save/restore
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    int dnext "PyDict_Next"(PyObject* d, Py_ssize_t* pos, PyObject** k, PyObject** v)
    long long c_as_ll "PyLong_AsLongLongAndOverflow"(PyObject* o, int* overflow)
    int c_is_int "PyLong_CheckExact"(PyObject* o)
    int c_is_str "PyUnicode_CheckExact"(PyObject* o)
    int c_is_dict "PyDict_CheckExact"(PyObject* o)
    int c_is_list "PyList_CheckExact"(PyObject* o)
    Py_ssize_t c_list_len "PyList_GET_SIZE"(PyObject* o)
    PyObject* c_list_item "PyList_GET_ITEM"(PyObject* o, Py_ssize_t i)
    Py_ssize_t c_str_len "PyUnicode_GET_LENGTH"(PyObject* o)
    int c_str_kind "PyUnicode_KIND"(PyObject* o)
    void* c_str_data "PyUnicode_DATA"(PyObject* o)
    object PyList_New(Py_ssize_t n)
    void PyList_SET_ITEM(object lst, Py_ssize_t i, object o)
    PyObject* Py_True
    PyObject* Py_False
    PyObject* Py_None
    ctypedef struct PyTupleObject:
        PyObject* ob_item[1]

cdef extern from *:
    """
    #ifdef LOYALTY_DEBUG
    #include <stdio.h>
    #include <stdlib.h>
    #define LDBG_CHECK(cond) do { if (!(cond)) { \\
        fprintf(stderr, "loyalty core invariant failed: %s (%s:%d)\\n", #cond, __FILE__, __LINE__); \\
        abort(); } } while (0)
    #else
    #define LDBG_CHECK(cond) ((void)0)
    #endif
    """
    void LDBG_CHECK(bint cond) noexcept nogil
    int __builtin_ctzll(unsigned long long x) noexcept nogil

DEF STACK_WORDS = 2048             # 32 KiB of 16-byte words: a typical receipt's whole work area
DEF INSERTION_MAX = 24

cdef int64_t MAX_MONEY = 1000000000000
cdef int64_t MAX_POINTS = 1000000000000
cdef int64_t MAX_QUANTITY = 1000000000
cdef Py_ssize_t MAX_LINES = 1000
cdef int64_t ROOM_INF = (<int64_t>1) << 62

cdef object K_SKU = "sku"
cdef object K_QUANTITY = "quantity"
cdef object K_PRICE = "price"
cdef object K_AMOUNT = "amount"
cdef object K_EXTERNAL = "external_discount"
cdef object K_MIN_PRICE = "min_price"
cdef object K_NO_DISCOUNT = "no_discount"
cdef object K_NO_ACCRUAL = "no_accrual"
cdef object K_NO_REDEEM = "no_redeem"
cdef object K_CATEGORIES = "categories"
cdef object K_AT = "at"
cdef object K_LINES = "lines"
cdef object K_STORE = "store"
cdef object K_TERMINAL = "terminal"
cdef object K_NUMBER = "number"
cdef object K_CHANNEL = "channel"
cdef object K_COUPONS = "coupons"
cdef object K_REDEEM_POINTS = "redeem_points"
cdef object K_CARD = "card"
cdef object K_STATUS = "status"
cdef object K_TIER = "tier"
cdef object K_ACTIVE_POINTS = "active_points"
cdef object K_PENDING_POINTS = "pending_points"
cdef object K_AUDIENCES = "audiences"
cdef object K_USAGE = "usage"
cdef object K_PURCHASES_SUM = "purchases_sum"
cdef object K_DISCOUNTS = "discounts"
cdef object K_PAYABLE = "payable"
cdef object K_REDEEMED = "redeemed"
cdef object K_POINTS = "points"
cdef object K_PROMOTION = "promotion"
cdef dict LINE_TEMPLATE = {"sku": None, "amount": None, "external_discount": None, "discounts": None,
                           "payable": None, "redeemed": None, "points": None}
cdef dict DISCOUNT_TEMPLATE = {"promotion": None, "amount": None}
cdef tuple STATUS_NAMES = ("active", "restricted", "suspended", "blocked")
cdef object S_POS = "pos"


# ---- small C helpers --------------------------------------------------------------------------------------

cdef inline int64_t i64min(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b

cdef inline int64_t i64max(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b

cdef inline int64_t room_of(int64_t cur, int64_t fl) noexcept nogil:
    return cur - fl if cur > fl else 0

cdef inline int128_t div128(int128_t x, int128_t d) noexcept nogil:
    """x // d for x >= 0, d > 0: a 64-bit division when both fit (gcc's __divti3 is a call)."""
    if x <= INT64_MAX and d <= INT64_MAX:
        return <int64_t>x // <int64_t>d
    return x // d

cdef inline int128_t mod128(int128_t x, int128_t d) noexcept nogil:
    if x <= INT64_MAX and d <= INT64_MAX:
        return <int64_t>x % <int64_t>d
    return x % d

cdef inline int128_t ceil_div(int128_t x, int128_t d) noexcept nogil:
    return div128(x + d - 1, d)

cdef inline int get(PyObject* d, object key, PyObject** out) noexcept:
    """Value at key (borrowed), None counting as absent (inputs.py). 1 when present."""
    cdef PyObject* v = dget(d, <PyObject*>key)
    if v == NULL:
        if PyErr_Occurred() != NULL:    # a key of the caller's whose __eq__ raised: not a valid request
            PyErr_Clear()
        return 0
    if v == Py_None:
        return 0
    out[0] = v
    return 1

cdef inline int read_int(PyObject* o, int64_t lo, int64_t hi, int64_t* out) noexcept:
    """An exact int in lo..hi (bool is not an int). 0 on success."""
    cdef int overflow = 0
    cdef long long v
    if not c_is_int(o):
        return 1
    v = c_as_ll(o, &overflow)
    if overflow or v < lo or v > hi:
        return 1
    out[0] = v
    return 0

cdef inline int read_bool(PyObject* o, bint* out) noexcept:
    if o == Py_True:
        out[0] = True
        return 0
    if o == Py_False:
        out[0] = False
        return 0
    return 1

cdef inline int32_t intern_id(dict ids, PyObject* s) noexcept:
    cdef PyObject* v = dget(<PyObject*>ids, s)
    cdef int overflow = 0
    if v == NULL:
        return -1
    return <int32_t>c_as_ll(v, &overflow)

cdef inline bint bit_get(const uint64_t* bits, int32_t i) noexcept nogil:
    return (bits[i >> 6] >> (i & 63)) & 1

cdef inline bint in_slice(const int32_t* pool, Slice sl, int32_t value) noexcept nogil:
    cdef int32_t j
    if value < 0:
        return False
    for j in range(sl.off, sl.off + sl.n):
        if pool[j] == value:
            return True
    return False

cdef inline void bit_set(uint64_t* bits, int32_t i) noexcept nogil:
    bits[i >> 6] |= (<uint64_t>1) << (i & 63)


cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    """Days since 1970-01-01 of a proleptic Gregorian date (y >= 1)."""
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = y // 400            # y >= 0 here
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468

cdef inline bint is_digit(unsigned char c) noexcept nogil:
    return c >= 48 and c <= 57

cdef inline int two(const unsigned char* s) noexcept nogil:
    return (s[0] - 48) * 10 + (s[1] - 48)

# The widest UTC offset of ``receipt.at``: java.time.ZoneOffset's +-18:00 (inputs.parse_at checks the same).
DEF MAX_OFFSET_MINUTES = 18 * 60
DEF AT_BAD_OFFSET = 2

cdef int parse_at(const unsigned char* s, Py_ssize_t n, int64_t* epoch, int32_t* wd,
                  int32_t* sod) noexcept nogil:
    """``YYYY-MM-DDTHH:MM[:SS[.f{1,9}]][Z|(+|-)HH[:]MM]`` (inputs._AT_RE, ASCII digits only). 0 when valid,
    AT_BAD_OFFSET when only the offset is out of java.time.ZoneOffset's range (over 18:00, or minutes over
    59), 1 for anything else."""
    cdef Py_ssize_t pos = 16, k
    cdef int year, month, day, hour, minute, second = 0, dim, off_h = 0, off_m = 0
    cdef int64_t days
    cdef int i
    if n < 16:
        return 1
    for i in range(16):
        if i != 4 and i != 7 and i != 10 and i != 13 and not is_digit(s[i]):
            return 1
    if s[4] != 45 or s[7] != 45 or s[10] != 84 or s[13] != 58:     # - - T :
        return 1
    if pos < n and s[pos] == 58:                                   # :SS
        if pos + 3 > n or not is_digit(s[pos + 1]) or not is_digit(s[pos + 2]):
            return 1
        second = two(s + pos + 1)
        pos += 3
        if pos < n and s[pos] == 46:                               # .f
            pos += 1
            k = 0
            while pos < n and is_digit(s[pos]):
                pos += 1
                k += 1
            if k < 1 or k > 9:
                return 1
    if pos < n:
        if s[pos] == 90:                                           # Z
            pos += 1
        elif s[pos] == 43 or s[pos] == 45:                         # + -
            if pos + 3 > n or not is_digit(s[pos + 1]) or not is_digit(s[pos + 2]):
                return 1
            off_h = two(s + pos + 1)
            pos += 3
            if pos < n and s[pos] == 58:
                pos += 1
            if pos + 2 > n or not is_digit(s[pos]) or not is_digit(s[pos + 1]):
                return 1
            off_m = two(s + pos)
            pos += 2
        else:
            return 1
    if pos != n:
        return 1
    year = two(s) * 100 + two(s + 2)
    month = two(s + 5)
    day = two(s + 8)
    hour = two(s + 11)
    minute = two(s + 14)
    if year < 1 or month < 1 or month > 12 or day < 1 or hour > 23 or minute > 59 or second > 59:
        return 1
    if month == 2:
        dim = 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        dim = 30
    else:
        dim = 31
    if day > dim:
        return 1
    if off_m > 59 or off_h * 60 + off_m > MAX_OFFSET_MINUTES:
        return AT_BAD_OFFSET
    days = days_from_civil(year, month, day)
    sod[0] = hour * 3600 + minute * 60 + second
    epoch[0] = days * 86400 + sod[0]
    wd[0] = <int32_t>(((days + 3) % 7 + 7) % 7 + 1)                # 1970-01-01 was a Thursday (4)
    return 0


# The keys of a line, by slot. A line dict is read in one PyDict_Next pass when its keys are these very
# string objects (literal keys are interned, so dicts built in Python code have them); any other key, or
# an equal but distinct string (json.loads), sends the line to one lookup per key.
cdef enum:                             # line key slots
    LK_SKU, LK_QUANTITY, LK_PRICE, LK_AMOUNT, LK_EXTERNAL, LK_MIN_PRICE, LK_NO_DISCOUNT, LK_NO_ACCRUAL,
    LK_NO_REDEEM, LK_CATEGORIES, LK_COUNT

cdef tuple LINE_KEYS = (K_SKU, K_QUANTITY, K_PRICE, K_AMOUNT, K_EXTERNAL, K_MIN_PRICE, K_NO_DISCOUNT,
                        K_NO_ACCRUAL, K_NO_REDEEM, K_CATEGORIES)


cdef inline void line_values(PyObject* d, PyObject** vals) noexcept:
    """vals[slot] = the line's value at each key (borrowed), NULL when absent or null."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef int j
    cdef PyObject** keys = <PyObject**>&(<PyTupleObject*>LINE_KEYS).ob_item[0]
    for j in range(LK_COUNT):
        vals[j] = NULL
    while dnext(d, &pos, &k, &v):
        for j in range(LK_COUNT):
            if k == keys[j]:
                vals[j] = NULL if v == Py_None else v
                break
        else:
            for j in range(LK_COUNT):
                vals[j] = NULL
                get(d, <object>keys[j], &vals[j])
            return


# ---- per-call memory ----------------------------------------------------------------------------------

cdef void* arena_alloc(Arena* a, size_t n) except NULL:
    cdef void* p
    n = (n + 15) & ~(<size_t>15)
    if n == 0:
        n = 16
    if a.used + n <= a.cap:
        p = a.buf + a.used
        a.used += n
        return p
    if a.nblocks >= 64:
        raise MemoryError("receipt work area")
    p = PyMem_Malloc(n)
    if p == NULL:
        raise MemoryError()
    a.blocks[a.nblocks] = p
    a.nblocks += 1
    return p

cdef void* arena_zalloc(Arena* a, size_t n) except NULL:
    cdef void* p = arena_alloc(a, n)
    memset(p, 0, n)
    return p

cdef void arena_release(Arena* a) noexcept:
    cdef int i
    for i in range(a.nblocks):
        PyMem_Free(a.blocks[i])
    a.nblocks = 0
    a.used = 0


# ---- sorting and splitting ----------------------------------------------------------------------------

cdef inline bint before(int mode, int32_t a, int32_t b, const int128_t* key, const int64_t* c,
                        const int64_t* u) noexcept nogil:
    """mode 0: key descending; mode 1: unit price c/u ascending (cross-multiplied). Stable sorts keep
    the lower index first on ties."""
    if mode == 0:
        return key[a] > key[b]
    return <int128_t>c[a] * u[b] < <int128_t>c[b] * u[a]

cdef void stable_sort(int32_t* order, int32_t n, int32_t* tmp, int mode, const int128_t* key,
                      const int64_t* c, const int64_t* u) noexcept nogil:
    cdef int32_t i, j, x, width, lo, mid, hi, k, a, b
    cdef int32_t* src
    cdef int32_t* dst
    cdef int32_t* t
    if n < 2:
        return
    if n <= INSERTION_MAX:
        for i in range(1, n):
            x = order[i]
            j = i - 1
            while j >= 0 and before(mode, x, order[j], key, c, u):
                order[j + 1] = order[j]
                j -= 1
            order[j + 1] = x
        return
    src = order
    dst = tmp
    width = 1
    while width < n:
        lo = 0
        while lo < n:
            mid = lo + width if lo + width < n else n
            hi = lo + 2 * width if lo + 2 * width < n else n
            a = lo
            b = mid
            k = lo
            while a < mid and b < hi:
                if before(mode, src[b], src[a], key, c, u):
                    dst[k] = src[b]
                    b += 1
                else:
                    dst[k] = src[a]
                    a += 1
                k += 1
            while a < mid:
                dst[k] = src[a]
                a += 1
                k += 1
            while b < hi:
                dst[k] = src[b]
                b += 1
                k += 1
            lo += 2 * width
        t = src
        src = dst
        dst = t
        width *= 2
    if src != order:
        memcpy(order, src, n * sizeof(int32_t))


cdef void split(Work* w, int128_t total, int32_t m) noexcept nogil:
    """ENGINE.md split over the m compact entries w.sw (weights), w.sroom (rooms) into w.sout: largest
    remainder, never past a room; what no entry can take is not given."""
    cdef int32_t k, cnt
    cdef int128_t left = total, W, q, given
    cdef bint any_over
    cdef int64_t* wt = w.sw
    cdef int64_t* room = w.sroom
    cdef int64_t* out = w.sout
    cdef char* act = w.sact
    for k in range(m):
        out[k] = 0
        act[k] = 1 if (wt[k] > 0 and room[k] > 0) else 0
    while True:
        W = 0
        for k in range(m):
            if act[k]:
                W += wt[k]
        if W == 0 or left <= 0:
            return
        any_over = False
        for k in range(m):
            if act[k] and left * wt[k] > <int128_t>room[k] * W:
                act[k] = 2
                any_over = True
        if any_over:
            for k in range(m):
                if act[k] == 2:
                    out[k] = room[k]
                    left -= room[k]
                    act[k] = 0
            continue
        given = 0
        cnt = 0
        for k in range(m):
            if act[k]:
                q = left * wt[k]
                out[k] = <int64_t>div128(q, W)
                w.skey[k] = mod128(q, W)
                given += out[k]
                w.sorder[cnt] = k
                cnt += 1
        left -= given
        LDBG_CHECK(left >= 0 and left < cnt + 1)
        if left > 0:
            stable_sort(w.sorder, cnt, w.stmp, 0, w.skey, NULL, NULL)
            k = 0
            while left > 0 and k < cnt:
                out[w.sorder[k]] += 1
                left -= 1
                k += 1
        return


cdef void effect_on(const CPromo* p, Work* w, const int64_t* cur, const char* take, int64_t* out) noexcept nogil:
    """What promotion p gives each taking line, from the amounts cur (ENGINE.md step 3 table)."""
    cdef int32_t L = w.L, i, m, k
    cdef CLine* ln = w.lines
    cdef int64_t room, d, units, free_left, kk
    cdef int128_t v = p.value, U
    for i in range(L):
        out[i] = 0
    if p.kind == EK_PERCENT_OFF:
        for i in range(L):
            if take[i]:
                d = <int64_t>div128(<int128_t>cur[i] * v, 10000)
                out[i] = i64min(room_of(cur[i], ln[i].floor), d)
    elif p.kind == EK_FIXED_PRICE:
        for i in range(L):
            if take[i]:
                d = cur[i] - <int64_t>((2 * v * ln[i].quantity + 1000) // 2000)
                out[i] = i64min(room_of(cur[i], ln[i].floor), i64max(0, d))
    elif p.kind == EK_AMOUNT_OFF and not p.per_receipt:
        for i in range(L):
            if take[i]:
                d = <int64_t>(v * ln[i].quantity // 1000)
                out[i] = i64min(room_of(cur[i], ln[i].floor), d)
    elif p.kind == EK_AMOUNT_OFF:
        m = 0
        for i in range(L):
            if take[i]:
                w.sidx[m] = i
                w.sw[m] = cur[i]
                w.sroom[m] = room_of(cur[i], ln[i].floor)
                m += 1
        split(w, v, m)
        for k in range(m):
            out[w.sidx[k]] = w.sout[k]
    elif p.kind == EK_NTH_FREE:
        m = 0
        U = 0
        for i in range(L):
            if take[i] and ln[i].units > 0:
                w.sidx[m] = i
                w.sw[m] = cur[i]
                w.sroom[m] = ln[i].units
                w.sorder[m] = m
                U += ln[i].units
                m += 1
        if p.value <= 0 or m == 0:
            return
        free_left = <int64_t>(U // p.value)
        if free_left == 0:
            return
        stable_sort(w.sorder, m, w.stmp, 1, NULL, w.sw, w.sroom)
        for k in range(m):
            i = w.sidx[w.sorder[k]]
            room = room_of(cur[i], ln[i].floor)
            if room == 0:
                continue
            units = ln[i].units
            kk = free_left if free_left < units else units
            free_left -= kk
            d = <int64_t>div128(<int128_t>cur[i] * kk, units)
            out[i] = i64min(room, d)
            if free_left == 0:
                break


cdef object py128(int128_t v):
    """A Python int from a 128-bit one (points can pass 64 bits only on absurd programs)."""
    cdef int64_t hi
    cdef uint64_t lo
    if v >= -INT64_MAX and v <= INT64_MAX:
        return <int64_t>v
    hi = <int64_t>(v >> 64)
    lo = <uint64_t>(v & <int128_t>0xFFFFFFFFFFFFFFFF)
    return (int(hi) << 64) + int(lo)


def _pct(int64_t hundredths):
    whole, frac = divmod(hundredths, 100)
    return str(whole) if frac == 0 else f"{whole}.{frac:02d}".rstrip("0")


def _money(v):
    return f"{v // 100}.{v % 100:02d}"


def _qty(q):
    return f"{q // 1000} pcs" if q % 1000 == 0 else f"{q // 1000}.{q % 1000:03d} kg"


def _effect_text(effect):
    kind = effect.kind
    v = effect.value
    if kind == "percent_off":
        return f"{_pct(v)}% off"
    if kind == "amount_off":
        return f"{_money(v)} off" + ("" if effect.per == "receipt" else " per unit")
    if kind == "fixed_price":
        return f"price {_money(v)}"
    if kind == "nth_free":
        return f"1 of every {v} units free"
    if kind == "points_multiplier":
        return f"x{_pct(v)} points"
    if kind == "extra_points_percent":
        return f"+{_pct(v)}% points"
    return f"+{v} points"


cdef int64_t _epoch_ceil(object d) except? -1:
    """Local epoch seconds of a naive datetime, rounded up (the receipt's time is whole seconds)."""
    secs = (d.toordinal() - 719163) * 86400 + d.hour * 3600 + d.minute * 60 + d.second
    return secs + (1 if d.microsecond else 0)


cdef _KIND_CODES = {"percent_off": EK_PERCENT_OFF, "amount_off": EK_AMOUNT_OFF, "fixed_price": EK_FIXED_PRICE,
                    "nth_free": EK_NTH_FREE, "points_multiplier": EK_POINTS_MULTIPLIER,
                    "extra_points_percent": EK_EXTRA_POINTS_PERCENT, "extra_points": EK_EXTRA_POINTS}


cdef int32_t* _to_c32(list values) except? NULL:
    cdef Py_ssize_t n = len(values), i
    cdef int32_t* p = <int32_t*>PyMem_Malloc((n if n > 0 else 1) * sizeof(int32_t))
    if p == NULL:
        raise MemoryError()
    for i in range(n):
        p[i] = values[i]
    return p


cdef int64_t* _to_c64(list values) except? NULL:
    cdef Py_ssize_t n = len(values), i
    cdef int64_t* p = <int64_t*>PyMem_Malloc((n if n > 0 else 1) * sizeof(int64_t))
    if p == NULL:
        raise MemoryError()
    for i in range(n):
        p[i] = values[i]
    return p


def _csr(list buckets):
    """Flatten lists of ints per id into (offsets, items)."""
    off = [0]
    items = []
    for b in buckets:
        items.extend(b)
        off.append(len(items))
    return off, items


def _intern(dict ids, s):
    v = ids.get(s)
    if v is None:
        v = ids[s] = len(ids)
    return v


def _receipt_dict(r):
    """A model.Receipt as the plain JSON dict the fast path reads (after parse_request accepted it)."""
    at = r.at
    return {
        "at": f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:{at.second:02d}",
        "store": str(r.store), "terminal": str(r.terminal), "number": str(r.number), "channel": str(r.channel),
        "coupons": [str(c) for c in r.coupons], "redeem_points": int(r.redeem_points),
        "lines": [{"sku": str(ln.sku), "quantity": int(ln.quantity), "price": int(ln.price),
                   "amount": int(ln.amount), "categories": [str(c) for c in ln.categories],
                   "external_discount": int(ln.external_discount), "min_price": int(ln.min_price),
                   "no_discount": bool(ln.no_discount), "no_accrual": bool(ln.no_accrual),
                   "no_redeem": bool(ln.no_redeem)} for ln in r.lines],
    }


def _member_dict(m):
    if m is None:
        return None
    return {
        "card": None if m.card is None else str(m.card), "status": str(m.status),
        "tier": None if m.tier is None else str(m.tier),
        "active_points": int(m.active_points), "pending_points": int(m.pending_points),
        "audiences": [str(a) for a in m.audiences],
        "usage": None if m.usage is None else {str(k): int(v) for k, v in m.usage.items()},
        "purchases_sum": None if m.purchases_sum is None else int(m.purchases_sum),
    }


cdef inline void mark_scope(char* insc, const int32_t* pe, const int32_t* off, const int32_t* idx, int32_t key,
                            int32_t i, int32_t L, char value) noexcept nogil:
    """Set line ``i`` in (1) or out of (0) the scope of every eligible promotion the index lists for ``key``
    (``pe`` maps a promotion to its eligible row, -1 when not eligible)."""
    cdef int32_t j, e
    for j in range(off[key], off[key + 1]):
        e = pe[idx[j]]
        if e >= 0:
            insc[<size_t>e * L + i] = value


@cython.final
cdef class Engine:
    """A program compiled for the core. ``calculate(receipt, member=None, budgets_used=None) -> dict``."""
    cdef readonly object program
    cdef object _parse_request
    cdef object _parse_budgets_used
    cdef dict _sku_ids
    cdef dict _cat_ids
    cdef dict _aud_ids
    cdef dict _tier_ids
    cdef dict _store_ids
    cdef dict _chan_ids
    cdef dict _coupon_ids
    cdef tuple _promo_ids            # str id of each promotion, in promotion order
    cdef tuple _effect_texts         # hint texts ("20% off")
    cdef tuple _gq_names             # group name of each condition group
    cdef tuple _tier_names
    # program scalars
    cdef int64_t point_value
    cdef int32_t stacking
    cdef bint on_redeemed_part
    cdef int64_t redeem_max_bp
    cdef int64_t min_payable
    cdef int64_t max_discount_bp
    cdef int64_t hint_within_bp
    cdef int32_t n_reduced
    cdef int64_t* reduced            # pairs (over_bp, max_bp)
    cdef int32_t n_tiers
    cdef CTier* tiers
    cdef int32_t n_aud
    cdef int32_t n_coupons
    # promotions
    cdef int32_t P
    cdef CPromo* promos
    cdef int32_t* pool
    cdef int32_t n_all
    cdef int32_t* all_scope          # promotions with scope all
    # scope indexes, CSR: off[id] .. off[id + 1] in the items array
    cdef int32_t n_skus
    cdef int32_t n_cats
    cdef int32_t* sku_inc_off
    cdef int32_t* sku_inc
    cdef int32_t* cat_inc_off
    cdef int32_t* cat_inc
    cdef int32_t* sku_exc_off
    cdef int32_t* sku_exc
    cdef int32_t* cat_exc_off
    cdef int32_t* cat_exc
    # group_quantity_at_least: condition groups, their members, their promotions
    cdef int32_t G
    cdef int32_t* sku_grp_off
    cdef int32_t* sku_grp
    cdef int32_t* cat_grp_off
    cdef int32_t* cat_grp
    cdef int32_t* grp_promo_off
    cdef int32_t* grp_promo
    cdef int32_t n_gq
    cdef int32_t* gq_promos          # every promotion with a group condition
    # receipt_total_at_least, sorted by value for hints
    cdef int32_t n_tot
    cdef int64_t* tot_vals
    cdef int32_t* tot_promos

    def __cinit__(self):
        self.promos = NULL
        self.pool = NULL
        self.tiers = NULL
        self.reduced = NULL
        self.all_scope = NULL
        self.sku_inc_off = self.sku_inc = self.cat_inc_off = self.cat_inc = NULL
        self.sku_exc_off = self.sku_exc = self.cat_exc_off = self.cat_exc = NULL
        self.sku_grp_off = self.sku_grp = self.cat_grp_off = self.cat_grp = NULL
        self.grp_promo_off = self.grp_promo = self.gq_promos = NULL
        self.tot_vals = NULL
        self.tot_promos = NULL

    def __dealloc__(self):
        cdef void* ptrs[24]
        cdef int i
        ptrs[:] = [<void*>self.promos, <void*>self.pool, <void*>self.tiers, <void*>self.reduced,
                   <void*>self.all_scope, <void*>self.sku_inc_off, <void*>self.sku_inc,
                   <void*>self.cat_inc_off, <void*>self.cat_inc, <void*>self.sku_exc_off, <void*>self.sku_exc,
                   <void*>self.cat_exc_off, <void*>self.cat_exc, <void*>self.sku_grp_off, <void*>self.sku_grp,
                   <void*>self.cat_grp_off, <void*>self.cat_grp, <void*>self.grp_promo_off,
                   <void*>self.grp_promo, <void*>self.gq_promos, <void*>self.tot_vals, <void*>self.tot_promos,
                   NULL, NULL]
        for i in range(24):
            if ptrs[i] != NULL:
                PyMem_Free(ptrs[i])

    def __init__(self, program):
        cdef Py_ssize_t i, n
        cdef CPromo* cp
        self.program = program
        self._parse_request = _inputs.parse_request
        self._parse_budgets_used = _inputs.parse_budgets_used
        self.point_value = program.point_value
        self.stacking = STACK_BEST if program.stacking == "best_for_customer" else STACK_PRIORITY
        self.on_redeemed_part = bool(program.on_redeemed_part)
        self.redeem_max_bp = program.redeem_max_bp
        self.min_payable = program.min_payable_per_line
        self.max_discount_bp = program.max_discount_bp
        self.hint_within_bp = program.hint_within_bp
        self.n_reduced = len(program.reduced)
        self.reduced = _to_c64([x for pair in program.reduced for x in pair])

        levels = program.tiers.levels
        self.n_tiers = len(levels)
        self.tiers = <CTier*>PyMem_Malloc((self.n_tiers + 1) * sizeof(CTier))
        if self.tiers == NULL:
            raise MemoryError()
        self._tier_ids = {}
        for i, t in enumerate(levels):
            self.tiers[i].threshold = t.threshold
            self.tiers[i].accrual_bp = t.accrual_bp
            self.tiers[i].redeem_max_bp = -1 if t.redeem_max_bp is None else t.redeem_max_bp
            self._tier_ids.setdefault(t.name, i)
        self._tier_names = tuple(t.name for t in levels)

        groups = {g.name: g for g in program.product_groups}
        promos = sorted(program.promotions, key=lambda p: (-p.priority, p.id))
        self.P = len(promos)
        self._promo_ids = tuple(p.id for p in promos)
        self._effect_texts = tuple(_effect_text(p.effect) for p in promos)
        self._sku_ids = {}
        self._cat_ids = {}
        self._aud_ids = {}
        self._store_ids = {}
        self._chan_ids = {}
        self._coupon_ids = {}
        gq_ids = {}
        pool = []
        # per promotion: include / exclude sku and category ids (groups resolved)
        inc_sk, inc_ct, exc_sk, exc_ct = [], [], [], []
        cdef list slices = []

        def slice_of(ids):
            off = len(pool)
            pool.extend(ids)
            return (off, len(ids))

        self.promos = <CPromo*>PyMem_Malloc((self.P + 1) * sizeof(CPromo))
        if self.promos == NULL:
            raise MemoryError()
        memset(self.promos, 0, (self.P + 1) * sizeof(CPromo))
        all_scope = []
        gq_promos = []
        tot = []
        for i, p in enumerate(promos):
            cp = &self.promos[i]
            e = p.effect
            cp.kind = _KIND_CODES[e.kind]
            cp.is_discount = cp.kind <= EK_NTH_FREE
            cp.per_receipt = (e.per == "receipt") if e.kind == "amount_off" else (
                e.per != "unit" if e.kind == "extra_points" else False)
            cp.exclusive = bool(p.exclusive)
            cp.value = e.value
            v = p.valid
            cp.has_starts = v.starts is not None
            cp.starts = _epoch_ceil(v.starts) if v.starts is not None else 0
            cp.has_ends = v.ends is not None
            cp.ends = _epoch_ceil(v.ends) if v.ends is not None else 0
            cp.weekdays = 0
            for d in v.weekdays:
                cp.weekdays |= 1 << d
            off, cnt = slice_of([x for pair in v.hours for x in pair])
            cp.hours.off, cp.hours.n = off, cnt
            off, cnt = slice_of(sorted({_intern(self._store_ids, s) for s in v.stores}))
            cp.stores.off, cp.stores.n = off, cnt
            off, cnt = slice_of(sorted({_intern(self._chan_ids, s) for s in v.channels}))
            cp.channels.off, cp.channels.n = off, cnt
            off, cnt = slice_of(sorted({_intern(self._aud_ids, s) for s in p.audience_include}))
            cp.aud_include.off, cp.aud_include.n = off, cnt
            off, cnt = slice_of(sorted({_intern(self._aud_ids, s) for s in p.audience_exclude}))
            cp.aud_exclude.off, cp.aud_exclude.n = off, cnt
            off, cnt = slice_of(sorted({_intern(self._tier_ids, s) for s in p.tiers}))
            cp.tiers.off, cp.tiers.n = off, cnt
            w = p.when
            cp.has_total = w.receipt_total_at_least is not None
            cp.total = w.receipt_total_at_least if cp.has_total else 0
            if cp.has_total:
                tot.append((cp.total, i))
            if w.group_quantity_at_least is not None:
                cp.gq_group = _intern(gq_ids, w.group_quantity_at_least[0])
                cp.gq_quantity = w.group_quantity_at_least[1]
                gq_promos.append(i)
            else:
                cp.gq_group = -1
            cp.coupon = -1 if w.coupon is None else _intern(self._coupon_ids, w.coupon)
            lim = p.limits
            cp.uses = -1 if lim.uses_per_member is None else lim.uses_per_member
            budgets = [b for b in (lim.discount_budget, lim.points_budget) if b is not None]
            cp.budget = min(budgets) if budgets else -1
            s = p.scope
            cp.scope_all = not (s.groups or s.skus or s.categories)
            if cp.scope_all:
                all_scope.append(i)
            isk, ict, esk, ect = set(s.skus), set(s.categories), set(s.exclude_skus), set(s.exclude_categories)
            for g in s.groups:
                if g in groups:
                    isk |= groups[g].skus
                    ict |= groups[g].categories
            for g in s.exclude_groups:
                if g in groups:
                    esk |= groups[g].skus
                    ect |= groups[g].categories
            inc_sk.append({_intern(self._sku_ids, x) for x in isk})
            inc_ct.append({_intern(self._cat_ids, x) for x in ict})
            exc_sk.append({_intern(self._sku_ids, x) for x in esk})
            exc_ct.append({_intern(self._cat_ids, x) for x in ect})
        # condition groups: their member skus / categories
        self.G = len(gq_ids)
        gq_names = [None] * self.G
        for name, gi in gq_ids.items():
            gq_names[gi] = name
        self._gq_names = tuple(gq_names)
        grp_sk = [{_intern(self._sku_ids, x) for x in groups[nm].skus} if nm in groups else set()
                  for nm in gq_names]
        grp_ct = [{_intern(self._cat_ids, x) for x in groups[nm].categories} if nm in groups else set()
                  for nm in gq_names]
        self.n_skus = len(self._sku_ids)
        self.n_cats = len(self._cat_ids)
        self.n_aud = len(self._aud_ids)
        self.n_coupons = len(self._coupon_ids)

        def index(per_promo, n_ids):
            buckets = [[] for _ in range(n_ids)]
            for pi, ids in enumerate(per_promo):
                for x in ids:
                    buckets[x].append(pi)
            return _csr(buckets)

        off, items = index(inc_sk, self.n_skus)
        self.sku_inc_off, self.sku_inc = _to_c32(off), _to_c32(items)
        off, items = index(inc_ct, self.n_cats)
        self.cat_inc_off, self.cat_inc = _to_c32(off), _to_c32(items)
        off, items = index(exc_sk, self.n_skus)
        self.sku_exc_off, self.sku_exc = _to_c32(off), _to_c32(items)
        off, items = index(exc_ct, self.n_cats)
        self.cat_exc_off, self.cat_exc = _to_c32(off), _to_c32(items)
        off, items = index(grp_sk, self.n_skus)
        self.sku_grp_off, self.sku_grp = _to_c32(off), _to_c32(items)
        off, items = index(grp_ct, self.n_cats)
        self.cat_grp_off, self.cat_grp = _to_c32(off), _to_c32(items)
        gbuckets = [[] for _ in range(self.G)]
        for pi in gq_promos:
            gbuckets[self.promos[pi].gq_group].append(pi)
        off, items = _csr(gbuckets)
        self.grp_promo_off, self.grp_promo = _to_c32(off), _to_c32(items)
        self.n_gq = len(gq_promos)
        self.gq_promos = _to_c32(gq_promos)
        self.n_all = len(all_scope)
        self.all_scope = _to_c32(all_scope)
        tot.sort()
        self.n_tot = len(tot)
        self.tot_vals = _to_c64([t[0] for t in tot])
        self.tot_promos = _to_c32([t[1] for t in tot])
        self.pool = _to_c32(pool)

    # ---- decoding -----------------------------------------------------------------------------------

    cdef int _decode(self, object receipt, object member, Work* w, Arena* a, int64_t* at_out,
                     int32_t* store, int32_t* chan, uint64_t* coupons, uint64_t* auds) except -2:
        """Fast path: read and validate the request dicts into w. 0: valid; 1: an anomaly (the caller
        asks inputs.parse_request, which names it)."""
        cdef PyObject* r = <PyObject*>receipt
        cdef PyObject* m = <PyObject*>member
        cdef PyObject* o
        cdef PyObject* ld
        cdef PyObject* lst
        cdef PyObject* x
        cdef Py_ssize_t L, i, j, n, cat_cap, pos
        cdef int32_t* grown
        cdef PyObject* vals[LK_COUNT]
        cdef int32_t wd, sod, cid
        cdef int64_t v, q, price
        cdef CLine* ln
        cdef PyObject** skus
        cdef bint counts
        if not c_is_dict(r):
            return 1
        # at
        if not get(r, K_AT, &o) or not c_is_str(o) or c_str_kind(o) != 1:
            return 1
        if parse_at(<const unsigned char*>c_str_data(o), c_str_len(o), at_out, &wd, &sod):
            return 1
        w.wd = wd
        w.sod = sod
        # lines
        if not get(r, K_LINES, &lst) or not c_is_list(lst):
            return 1
        L = c_list_len(lst)
        if L < 1 or L > MAX_LINES:
            return 1
        w.L = <int32_t>L
        w.lines = <CLine*>arena_zalloc(a, L * sizeof(CLine))
        cat_cap = 4 * L + 8
        w.cats = <int32_t*>arena_alloc(a, cat_cap * sizeof(int32_t))
        skus = <PyObject**>arena_alloc(a, L * sizeof(PyObject*))
        w.skus = skus
        n = 0
        w.total = 0
        for i in range(L):
            ld = c_list_item(lst, i)
            if not c_is_dict(ld):
                return 1
            line_values(ld, vals)
            ln = &w.lines[i]
            o = vals[LK_SKU]
            if o == NULL or not c_is_str(o) or c_str_len(o) == 0:
                return 1
            skus[i] = o
            ln.sku = intern_id(self._sku_ids, o)
            o = vals[LK_QUANTITY]
            if o == NULL or read_int(o, 1, MAX_QUANTITY, &q):
                return 1
            o = vals[LK_PRICE]
            if o == NULL or read_int(o, 0, MAX_MONEY, &price):
                return 1
            ln.quantity = q
            o = vals[LK_AMOUNT]
            if o != NULL:
                if read_int(o, 0, MAX_MONEY, &ln.amount):
                    return 1
            else:
                v = <int64_t>div128(2 * <int128_t>q * price + 1000, 2000)
                if v > MAX_MONEY:
                    return 1
                ln.amount = v
            o = vals[LK_EXTERNAL]
            if o != NULL and (read_int(o, 0, MAX_MONEY, &ln.external) or ln.external > ln.amount):
                return 1
            o = vals[LK_MIN_PRICE]
            if o != NULL and read_int(o, 0, MAX_MONEY, &ln.min_price):
                return 1
            o = vals[LK_NO_DISCOUNT]
            if o != NULL and read_bool(o, &ln.no_discount):
                return 1
            o = vals[LK_NO_ACCRUAL]
            if o != NULL and read_bool(o, &ln.no_accrual):
                return 1
            o = vals[LK_NO_REDEEM]
            if o != NULL and read_bool(o, &ln.no_redeem):
                return 1
            ln.cat_off = <int32_t>n
            o = vals[LK_CATEGORIES]
            if o != NULL:
                if not c_is_list(o):
                    return 1
                if n + c_list_len(o) > cat_cap:         # grow (rare: many categories per line)
                    cat_cap = 2 * (n + c_list_len(o)) + L
                    grown = <int32_t*>arena_alloc(a, cat_cap * sizeof(int32_t))
                    memcpy(grown, w.cats, n * sizeof(int32_t))
                    w.cats = grown
                for j in range(c_list_len(o)):
                    x = c_list_item(o, j)
                    if not c_is_str(x):
                        return 1
                    cid = intern_id(self._cat_ids, x)
                    if cid >= 0:
                        w.cats[n] = cid
                        n += 1
            ln.cat_n = <int32_t>(n - ln.cat_off)
            ln.base = ln.amount - ln.external
            ln.units = q // 1000 if q % 1000 == 0 else 0
            ln.floor = <int64_t>i64max(<int64_t>ceil_div(<int128_t>ln.min_price * q, 1000),
                                       <int64_t>ceil_div(<int128_t>ln.base * (10000 - self.max_discount_bp), 10000))
            w.total += ln.base
        # receipt scalars
        store[0] = -1
        if get(r, K_STORE, &o):
            if not c_is_str(o):
                return 1
            store[0] = intern_id(self._store_ids, o)
        else:
            store[0] = intern_id(self._store_ids, <PyObject*>"")
        if get(r, K_TERMINAL, &o) and not c_is_str(o):
            return 1
        if get(r, K_NUMBER, &o) and not c_is_str(o):
            return 1
        if get(r, K_CHANNEL, &o):
            if not c_is_str(o):
                return 1
            chan[0] = intern_id(self._chan_ids, o)
        else:
            chan[0] = intern_id(self._chan_ids, <PyObject*>S_POS)
        if get(r, K_COUPONS, &o):
            if not c_is_list(o):
                return 1
            for j in range(c_list_len(o)):
                x = c_list_item(o, j)
                if not c_is_str(x):
                    return 1
                cid = intern_id(self._coupon_ids, x)
                if cid >= 0:
                    bit_set(coupons, cid)
        w.redeem_points = 0
        if get(r, K_REDEEM_POINTS, &o) and read_int(o, 0, MAX_POINTS, &w.redeem_points):
            return 1
        # member
        w.active_points = w.pending_points = 0
        w.purchases_sum = -1
        w.status = ST_NONE
        w.tier = -1
        w.card = NULL
        w.usage = NULL
        if m == Py_None:
            return 0
        if not c_is_dict(m):
            return 1
        if get(m, K_CARD, &o):
            if not c_is_str(o):
                return 1
            w.card = o
        w.status = ST_ACTIVE
        if get(m, K_STATUS, &o):
            if not c_is_str(o):
                return 1
            for j in range(4):
                if (<object>o) == STATUS_NAMES[j]:
                    w.status = <int32_t>j
                    break
            else:
                return 1
        w.tier = 0 if self.n_tiers > 0 else -1
        if get(m, K_TIER, &o):
            if not c_is_str(o):
                return 1
            cid = intern_id(self._tier_ids, o)
            if cid < 0 or cid >= self.n_tiers:
                return 1
            w.tier = cid
        if get(m, K_ACTIVE_POINTS, &o) and read_int(o, 0, MAX_POINTS, &w.active_points):
            return 1
        if get(m, K_PENDING_POINTS, &o) and read_int(o, 0, MAX_POINTS, &w.pending_points):
            return 1
        if get(m, K_PURCHASES_SUM, &o) and read_int(o, 0, MAX_MONEY, &w.purchases_sum):
            return 1
        counts = w.status == ST_ACTIVE or w.status == ST_RESTRICTED
        if get(m, K_AUDIENCES, &o):
            if not c_is_list(o):
                return 1
            for j in range(c_list_len(o)):
                x = c_list_item(o, j)
                if not c_is_str(x):
                    return 1
                cid = intern_id(self._aud_ids, x)
                if cid >= 0 and counts:
                    bit_set(auds, cid)
        if get(m, K_USAGE, &o):
            if not c_is_dict(o):
                return 1
            pos = 0
            while dnext(o, &pos, &x, &ld):
                if not c_is_str(x) or read_int(ld, 0, MAX_POINTS, &v):
                    return 1
            if counts:
                w.usage = o
        return 0

    # ---- eligibility (step 2) -------------------------------------------------------------------------

    cdef int32_t _check(self, int32_t pi, const Work* w, int64_t at, int32_t store, int32_t chan,
                        const uint64_t* coupons, const uint64_t* auds, const int64_t* gqty,
                        PyObject* budgets) noexcept:
        """Why promotion pi is not eligible: 0 (eligible), FAIL_OTHER, or FAIL_TOTAL / FAIL_GQ bits
        (only receipt-level conditions failed, which is what hints need)."""
        cdef const CPromo* p = &self.promos[pi]
        cdef const int32_t* pool = self.pool
        cdef int32_t mask = 0, j, s, e, sod = w.sod
        cdef bint ok
        cdef PyObject* o
        cdef int64_t v
        if p.has_starts and at < p.starts:
            return FAIL_OTHER
        if p.has_ends and at >= p.ends:
            return FAIL_OTHER
        if p.weekdays and not ((p.weekdays >> w.wd) & 1):
            return FAIL_OTHER
        if p.hours.n:
            ok = False
            for j in range(p.hours.off, p.hours.off + p.hours.n, 2):
                s = pool[j]
                e = pool[j + 1]
                if (s < e and s <= sod and sod < e) or (e <= s and (sod >= s or sod < e)):
                    ok = True
                    break
            if not ok:
                return FAIL_OTHER
        # an unknown store or channel (id -1) is in no list
        if p.stores.n and not in_slice(pool, p.stores, store):
            return FAIL_OTHER
        if p.channels.n and not in_slice(pool, p.channels, chan):
            return FAIL_OTHER
        # audiences: an anonymous receipt's bitmap is empty (it holds none)
        for j in range(p.aud_include.off, p.aud_include.off + p.aud_include.n):
            if not bit_get(auds, pool[j]):
                return FAIL_OTHER
        for j in range(p.aud_exclude.off, p.aud_exclude.off + p.aud_exclude.n):
            if bit_get(auds, pool[j]):
                return FAIL_OTHER
        if p.tiers.n:
            if w.anonymous or w.tier < 0:
                return FAIL_OTHER
            ok = False
            for j in range(p.tiers.off, p.tiers.off + p.tiers.n):
                if pool[j] == w.tier:
                    ok = True
                    break
            if not ok:
                return FAIL_OTHER
        if p.coupon >= 0 and not bit_get(coupons, p.coupon):
            return FAIL_OTHER
        if p.uses >= 0:
            if w.anonymous:
                return FAIL_OTHER
            v = 0
            if w.usage != NULL:
                o = dget(w.usage, <PyObject*>self._promo_ids[pi])
                if o != NULL:
                    read_int(o, 0, MAX_POINTS, &v)
            if v >= p.uses:
                return FAIL_OTHER
        if p.budget >= 0:
            v = 0
            if budgets != NULL:
                o = dget(budgets, <PyObject*>self._promo_ids[pi])
                if o != NULL:
                    read_int(o, 0, MAX_MONEY, &v)
            if v >= p.budget:
                return FAIL_OTHER
        if p.has_total and w.total < p.total:
            mask |= FAIL_TOTAL
        if p.gq_group >= 0 and gqty[p.gq_group] < p.gq_quantity:
            mask |= FAIL_GQ
        return mask

    # ---- line discounts (step 3) ----------------------------------------------------------------------

    cdef void _discounts(self, Work* w) noexcept nogil:
        cdef int32_t L = w.L, E = w.E, e, i, best_first, cfirst
        cdef CLine* ln = w.lines
        cdef const CPromo* p
        cdef char* row
        cdef int64_t* out
        cdef int64_t d, ctot, best
        cdef char* take = w.take
        cdef bint prio = self.stacking == STACK_PRIORITY
        for i in range(L):
            ln[i].disc = 0
            ln[i].ended = False
            w.scur[i] = ln[i].base
            w.sbase[i] = ln[i].base
        # priority: one walk; best_for_customer: the cascade of the non-exclusive ones
        for e in range(E):
            p = &self.promos[w.elig[e]]
            if not p.is_discount or (p.exclusive and not prio):
                continue
            row = w.insc + <size_t>e * L
            out = w.dmat + <size_t>e * L
            for i in range(L):
                take[i] = row[i] and not ln[i].no_discount and not ln[i].ended and not (
                    p.exclusive and ln[i].disc != 0)
            effect_on(p, w, w.scur, take, out)
            for i in range(L):
                d = out[i]
                if d > 0:
                    w.scur[i] -= d
                    ln[i].disc += d
                    if p.exclusive:
                        ln[i].ended = True
                LDBG_CHECK(d >= 0 and w.scur[i] >= 0)
        if prio:
            return
        # best_for_customer: each exclusive alone on the base amounts, then the best candidate per line
        for e in range(E):
            p = &self.promos[w.elig[e]]
            if not p.is_discount or not p.exclusive:
                continue
            row = w.insc + <size_t>e * L
            for i in range(L):
                take[i] = row[i] and not ln[i].no_discount
            effect_on(p, w, w.sbase, take, w.dmat + <size_t>e * L)
        for i in range(L):
            ctot = 0
            cfirst = -1
            for e in range(E):
                p = &self.promos[w.elig[e]]
                if p.is_discount and not p.exclusive:
                    d = w.dmat[<size_t>e * L + i]
                    if d > 0:
                        ctot += d
                        if cfirst < 0:
                            cfirst = e
            best = ctot
            best_first = cfirst if ctot > 0 else E
            for e in range(E):
                p = &self.promos[w.elig[e]]
                if p.is_discount and p.exclusive:
                    d = w.dmat[<size_t>e * L + i]
                    if d > 0 and (d > best or (d == best and e < best_first)):
                        best = d
                        best_first = e
            if best > 0 and not self.promos[w.elig[best_first]].exclusive:
                for e in range(E):          # the cascade wins: drop the exclusives
                    if self.promos[w.elig[e]].exclusive:
                        w.dmat[<size_t>e * L + i] = 0
            elif best > 0:
                for e in range(E):          # an exclusive wins: it alone
                    if e != best_first:
                        w.dmat[<size_t>e * L + i] = 0
            ln[i].disc = best

    # ---- write-off and accrual (steps 4-6) --------------------------------------------------------------

    cdef void _writeoff_accrual(self, Work* w) noexcept nogil:
        cdef int32_t L = w.L, E = w.E, e, i, m, k, j
        cdef CLine* ln = w.lines
        cdef const CPromo* p
        cdef char* row
        cdef int64_t cap_bp, ext = 0, amt = 0, pay = 0, rooms = 0, cap_amount, pv = self.point_value
        cdef int64_t tier_bp = 0, mm
        cdef int128_t D, sum_n = 0, R, left
        for i in range(L):
            ln[i].payable = ln[i].base - ln[i].disc
            ln[i].redeemed = 0
            ln[i].points = 0
            LDBG_CHECK(ln[i].payable >= 0)
        # step 4: the cap
        cap_bp = self.redeem_max_bp
        if w.tier >= 0 and not w.anonymous and self.tiers[w.tier].redeem_max_bp >= 0:
            cap_bp = self.tiers[w.tier].redeem_max_bp
        # the external share is the whole receipt's (no_redeem lines too); the amounts of the cap are the
        # redeemable lines'
        for i in range(L):
            ext += ln[i].external
            amt += ln[i].amount
            if not ln[i].no_redeem:
                pay += ln[i].payable
                rooms += i64max(0, ln[i].payable - self.min_payable)
        for k in range(self.n_reduced):
            if amt > 0 and <int128_t>ext * 10000 > <int128_t>self.reduced[2 * k] * amt:
                cap_bp = i64min(cap_bp, self.reduced[2 * k + 1])
        cap_amount = i64min(<int64_t>(<int128_t>pay * cap_bp // 10000), rooms)
        if w.status == ST_ACTIVE:
            w.max_points = i64min(cap_amount // pv, w.active_points)
        else:
            w.max_points = 0
        w.applied = i64min(w.redeem_points, w.max_points)
        # step 5: the allocation
        if w.applied > 0:
            m = 0
            for i in range(L):
                if not ln[i].no_redeem:
                    w.sidx[m] = i
                    w.sw[m] = ln[i].payable
                    w.sroom[m] = ln[i].payable - self.min_payable
                    m += 1
            split(w, <int128_t>w.applied * pv, m)
            for k in range(m):
                ln[w.sidx[k]].redeemed = w.sout[k]
        # step 6: accrual
        if w.anonymous:
            return
        if w.tier >= 0:
            tier_bp = self.tiers[w.tier].accrual_bp
        for i in range(L):
            ln[i].rate_bp = tier_bp
            ln[i].mult = 100
        for e in range(E):
            p = &self.promos[w.elig[e]]
            if p.is_discount:
                continue
            row = w.insc + <size_t>e * L
            for i in range(L):
                if row[i] and not ln[i].no_accrual:
                    w.used[e] = 1
                    if p.kind == EK_POINTS_MULTIPLIER:
                        ln[i].mult = i64max(ln[i].mult, p.value)
                    elif p.kind == EK_EXTRA_POINTS_PERCENT:
                        ln[i].rate_bp += p.value
        D = <int128_t>1000000 * pv
        m = 0
        for i in range(L):
            if ln[i].no_accrual:
                ln[i].n = 0
                continue
            mm = ln[i].payable if self.on_redeemed_part else ln[i].payable - ln[i].redeemed
            ln[i].n = <int128_t>mm * ln[i].rate_bp * ln[i].mult
            sum_n += ln[i].n
            ln[i].points = div128(ln[i].n, D)
            w.skey[i] = mod128(ln[i].n, D)
            w.sorder[m] = i
            m += 1
        R = sum_n // D
        left = R
        for i in range(L):
            left -= ln[i].points
        LDBG_CHECK(left >= 0 and left <= m)
        if left > 0:
            stable_sort(w.sorder, m, w.stmp, 0, w.skey, NULL, NULL)
            k = 0
            while left > 0 and k < m:
                ln[w.sorder[k]].points += 1
                left -= 1
                k += 1
        # fixed extra points on top
        for e in range(E):
            p = &self.promos[w.elig[e]]
            if p.kind != EK_EXTRA_POINTS or not w.used[e]:
                continue
            row = w.insc + <size_t>e * L
            if p.per_receipt:
                m = 0
                for i in range(L):
                    if row[i] and not ln[i].no_accrual:
                        w.sidx[m] = i
                        w.sw[m] = ln[i].payable
                        w.sroom[m] = ROOM_INF
                        m += 1
                split(w, p.value, m)
                for k in range(m):
                    ln[w.sidx[k]].points += w.sout[k]
            else:
                for i in range(L):
                    if row[i] and not ln[i].no_accrual and ln[i].units > 0:
                        ln[i].points += <int128_t>p.value * ln[i].units

    # ---- the request ----------------------------------------------------------------------------------

    def calculate(self, receipt, member=None, budgets_used=None):
        """The answer dict of docs/ENGINE.md for one receipt; ``InputError`` on bad input."""
        cdef int128_t stackbuf[STACK_WORDS]
        cdef Arena arena
        cdef Work w
        cdef int64_t at = 0
        cdef int32_t store = -1, chan = -1
        cdef uint64_t* coupons
        cdef uint64_t* auds
        cdef int rc
        budgets = budgets_used
        if budgets is not None and not _budgets_ok(budgets):
            budgets = self._parse_budgets_used(budgets_used)
        arena.buf = <char*>stackbuf
        arena.cap = sizeof(stackbuf)
        arena.used = 0
        arena.nblocks = 0
        try:
            memset(&w, 0, sizeof(Work))
            coupons = <uint64_t*>arena_zalloc(&arena, ((self.n_coupons >> 6) + 1) * sizeof(uint64_t))
            auds = <uint64_t*>arena_zalloc(&arena, ((self.n_aud >> 6) + 1) * sizeof(uint64_t))
            rc = self._decode(receipt, member, &w, &arena, &at, &store, &chan, coupons, auds)
            if rc:
                # an anomaly: the reference's parser names it; should it accept the request after all,
                # its normalised form is decoded again (so both engines answer the same)
                parsed = self._parse_request(receipt, member, self.program)
                try:
                    receipt = _receipt_dict(parsed[0])
                    member = _member_dict(parsed[1])
                except Exception:
                    raise InputError("receipt", "invalid") from None
                arena_release(&arena)
                memset(&w, 0, sizeof(Work))
                coupons = <uint64_t*>arena_zalloc(&arena, ((self.n_coupons >> 6) + 1) * sizeof(uint64_t))
                auds = <uint64_t*>arena_zalloc(&arena, ((self.n_aud >> 6) + 1) * sizeof(uint64_t))
                rc = self._decode(receipt, member, &w, &arena, &at, &store, &chan, coupons, auds)
                if rc:
                    raise InputError("receipt", "invalid")
            # receipt and member (borrowed pointers in w) stay alive in this frame until the answer is built
            return self._run(&w, &arena, at, store, chan, coupons, auds, budgets)
        finally:
            arena_release(&arena)

    cdef object _run(self, Work* w, Arena* a, int64_t at, int32_t store, int32_t chan, uint64_t* coupons,
                     uint64_t* auds, object budgets):
        cdef int32_t L = w.L, P = self.P, G = self.G, i, j, g, e, E, pi, b, nwords
        cdef CLine* ln
        cdef int64_t* gqty
        cdef int32_t* gstamp
        cdef uint64_t* cand
        cdef uint64_t word
        cdef int32_t* pe
        cdef int32_t mask, lo, hi, mid, value
        cdef int64_t missing, within = self.hint_within_bp, T = w.total
        cdef const CPromo* p
        cdef PyObject* bud = NULL if budgets is None else <PyObject*>budgets
        cdef list hints = []
        w.anonymous = not (w.status == ST_ACTIVE or w.status == ST_RESTRICTED)
        # quantities of the condition groups (a line counts once per group)
        gqty = <int64_t*>arena_zalloc(a, (G + 1) * sizeof(int64_t))
        gstamp = <int32_t*>arena_zalloc(a, (G + 1) * sizeof(int32_t))
        if G:
            for i in range(L):
                ln = &w.lines[i]
                if ln.sku >= 0:
                    for j in range(self.sku_grp_off[ln.sku], self.sku_grp_off[ln.sku + 1]):
                        g = self.sku_grp[j]
                        if gstamp[g] != i + 1:
                            gstamp[g] = i + 1
                            gqty[g] += ln.quantity
                for b in range(ln.cat_off, ln.cat_off + ln.cat_n):
                    for j in range(self.cat_grp_off[w.cats[b]], self.cat_grp_off[w.cats[b] + 1]):
                        g = self.cat_grp[j]
                        if gstamp[g] != i + 1:
                            gstamp[g] = i + 1
                            gqty[g] += ln.quantity
        # candidates: promotions some line can reach, and those a hint may name
        nwords = (P >> 6) + 1
        cand = <uint64_t*>arena_zalloc(a, nwords * sizeof(uint64_t))
        for j in range(self.n_all):
            bit_set(cand, self.all_scope[j])
        for i in range(L):
            ln = &w.lines[i]
            if ln.sku >= 0:
                for j in range(self.sku_inc_off[ln.sku], self.sku_inc_off[ln.sku + 1]):
                    bit_set(cand, self.sku_inc[j])
            for b in range(ln.cat_off, ln.cat_off + ln.cat_n):
                for j in range(self.cat_inc_off[w.cats[b]], self.cat_inc_off[w.cats[b] + 1]):
                    bit_set(cand, self.cat_inc[j])
        if self.n_tot:
            lo = 0
            hi = self.n_tot
            while lo < hi:                  # first threshold above T
                mid = (lo + hi) >> 1
                if self.tot_vals[mid] > T:
                    hi = mid
                else:
                    lo = mid + 1
            for j in range(lo, self.n_tot):
                # value - T - value * within // 10000 never decreases while within <= 100%
                if self.tot_vals[j] - T > <int64_t>(<int128_t>self.tot_vals[j] * within // 10000):
                    if within <= 10000:
                        break
                    continue
                bit_set(cand, self.tot_promos[j])
        if self.n_gq:
            if within >= 10000:
                for j in range(self.n_gq):
                    bit_set(cand, self.gq_promos[j])
            else:
                for g in range(G):
                    if gqty[g] > 0:
                        for j in range(self.grp_promo_off[g], self.grp_promo_off[g + 1]):
                            bit_set(cand, self.grp_promo[j])
        # eligibility, in promotion order
        E = 0
        for b in range(nwords):
            word = cand[b]
            while word:
                pi = (b << 6) + <int32_t>__builtin_ctzll(word)
                word &= word - 1
                mask = self._check(pi, w, at, store, chan, coupons, auds, gqty, bud)
                if mask == 0:
                    E += 1                  # stays in cand
                elif mask == FAIL_TOTAL or mask == FAIL_GQ:
                    p = &self.promos[pi]
                    if not p.is_discount and w.anonymous:
                        pass
                    elif mask == FAIL_TOTAL:
                        missing = p.total - T
                        if 0 < missing <= <int64_t>(<int128_t>p.total * within // 10000):
                            hints.append(self._hint(pi, "receipt_total_at_least", missing,
                                                    f"add {_money(missing)} to get {self._effect_texts[pi]}"))
                    else:
                        missing = p.gq_quantity - gqty[p.gq_group]
                        if 0 < missing <= <int64_t>(<int128_t>p.gq_quantity * within // 10000):
                            hints.append(self._hint(
                                pi, "group_quantity_at_least", missing,
                                f"add {_qty(missing)} of {self._gq_names[p.gq_group]} to get "
                                f"{self._effect_texts[pi]}"))
                    cand[b] &= ~((<uint64_t>1) << (pi & 63))
                else:
                    cand[b] &= ~((<uint64_t>1) << (pi & 63))
        w.E = E
        w.elig = <int32_t*>arena_alloc(a, (E + 1) * sizeof(int32_t))
        E = 0
        for b in range(nwords):
            word = cand[b]
            while word:
                w.elig[E] = (b << 6) + <int32_t>__builtin_ctzll(word)
                word &= word - 1
                E += 1
        # which lines are in each eligible promotion's scope (E x L)
        w.insc = <char*>arena_zalloc(a, <size_t>E * L + 1)
        if E:
            pe = <int32_t*>arena_alloc(a, P * sizeof(int32_t))
            memset(pe, 0xFF, P * sizeof(int32_t))
            for e in range(E):
                pe[w.elig[e]] = e
                if self.promos[w.elig[e]].scope_all:
                    memset(w.insc + <size_t>e * L, 1, L)
            # includes first, then excludes over them: an excluded line leaves the scope whatever matched it
            for value in range(1, -1, -1):
                for i in range(L):
                    ln = &w.lines[i]
                    if ln.sku >= 0:
                        mark_scope(w.insc, pe, self.sku_inc_off if value else self.sku_exc_off,
                                   self.sku_inc if value else self.sku_exc, ln.sku, i, L, <char>value)
                    for b in range(ln.cat_off, ln.cat_off + ln.cat_n):
                        mark_scope(w.insc, pe, self.cat_inc_off if value else self.cat_exc_off,
                                   self.cat_inc if value else self.cat_exc, w.cats[b], i, L, <char>value)
        # work arrays
        w.dmat = <int64_t*>arena_zalloc(a, (<size_t>E * L + 1) * sizeof(int64_t))
        w.used = <char*>arena_zalloc(a, E + 1)
        w.drows = <int32_t*>arena_alloc(a, (E + 1) * sizeof(int32_t))
        w.sw = <int64_t*>arena_alloc(a, L * sizeof(int64_t))
        w.sroom = <int64_t*>arena_alloc(a, L * sizeof(int64_t))
        w.sout = <int64_t*>arena_alloc(a, L * sizeof(int64_t))
        w.scur = <int64_t*>arena_alloc(a, L * sizeof(int64_t))
        w.sbase = <int64_t*>arena_alloc(a, L * sizeof(int64_t))
        w.skey = <int128_t*>arena_alloc(a, L * sizeof(int128_t))
        w.sidx = <int32_t*>arena_alloc(a, L * sizeof(int32_t))
        w.sorder = <int32_t*>arena_alloc(a, L * sizeof(int32_t))
        w.stmp = <int32_t*>arena_alloc(a, L * sizeof(int32_t))
        w.sact = <char*>arena_alloc(a, L)
        w.take = <char*>arena_alloc(a, L)
        if <int64_t>L * (E + 1) >= 4096:
            with nogil:
                self._discounts(w)
                self._writeoff_accrual(w)
        else:
            self._discounts(w)
            self._writeoff_accrual(w)
        return self._answer(w, hints)

    cdef object _hint(self, int32_t pi, str condition, int64_t missing, str message):
        return {"promotion": self._promo_ids[pi], "condition": condition, "missing": missing,
                "message": message}

    # ---- the answer -----------------------------------------------------------------------------------

    cdef object _answer(self, Work* w, list hints):
        cdef int32_t L = w.L, E = w.E, i, e, cnt, k, nd = 0, j
        cdef CLine* ln
        cdef int64_t d, t_amount = 0, t_ext = 0, t_disc = 0, t_pay = 0, t_red = 0
        cdef int128_t t_points = 0
        cdef const int64_t* dmat = w.dmat
        cdef const int64_t* row
        cdef tuple ids = self._promo_ids
        cdef dict item
        cdef int32_t* drows = w.drows
        # the discount promotions that gave some line more than zero (promotion order)
        for e in range(E):
            if self.promos[w.elig[e]].is_discount:
                row = dmat + <size_t>e * L
                for i in range(L):
                    if row[i] > 0:
                        drows[nd] = e
                        nd += 1
                        w.used[e] = 1
                        break
        lines = PyList_New(L)
        for i in range(L):
            ln = &w.lines[i]
            cnt = 0
            for j in range(nd):
                if dmat[<size_t>drows[j] * L + i] > 0:
                    cnt += 1
            discounts = PyList_New(cnt)
            k = 0
            if cnt:
                for j in range(nd):
                    e = drows[j]
                    d = dmat[<size_t>e * L + i]
                    if d > 0:
                        item = (<dict>DISCOUNT_TEMPLATE).copy()
                        item[K_PROMOTION] = ids[w.elig[e]]
                        item[K_AMOUNT] = d
                        Py_INCREF(item)
                        PyList_SET_ITEM(discounts, k, item)
                        k += 1
            item = (<dict>LINE_TEMPLATE).copy()
            item[K_SKU] = <object>w.skus[i]
            item[K_AMOUNT] = ln.amount
            item[K_EXTERNAL] = ln.external
            item[K_DISCOUNTS] = discounts
            item[K_PAYABLE] = ln.payable
            item[K_REDEEMED] = ln.redeemed
            item[K_POINTS] = py128(ln.points)
            Py_INCREF(item)
            PyList_SET_ITEM(lines, i, item)
            t_amount += ln.amount
            t_ext += ln.external
            t_disc += ln.disc
            t_pay += ln.payable
            t_red += ln.redeemed
            t_points += ln.points
        cnt = 0
        for e in range(E):
            if w.used[e]:
                cnt += 1
        promotions = PyList_New(cnt)
        k = 0
        for e in range(E):
            if w.used[e]:
                pid = ids[w.elig[e]]
                Py_INCREF(pid)
                PyList_SET_ITEM(promotions, k, pid)
                k += 1
        accrued = py128(t_points)
        totals = {"amount": t_amount, "external_discount": t_ext, "discount": t_disc, "payable": t_pay,
                  "max_points": w.max_points, "redeemed_points": w.applied,
                  "redeemed_amount": t_red, "accrued_points": accrued}
        # member and messages
        card = None if w.card == NULL else <object>w.card
        messages = []
        who = "member" if card is None else f"card {card}"
        if w.status == ST_SUSPENDED or w.status == ST_BLOCKED:
            messages.append(f"{who} is {STATUS_NAMES[w.status]}: served as anonymous")
        elif w.status == ST_RESTRICTED and w.redeem_points > 0:
            messages.append(f"{who} is restricted: points cannot be written off")
        elif w.status == ST_ACTIVE and w.redeem_points > w.max_points:
            messages.append(f"requested {w.redeem_points} points, {w.max_points} can be written off")
        elif w.status == ST_NONE and w.redeem_points > 0:
            messages.append("no card: points cannot be written off")
        if w.anonymous:
            member = {"card": card, "status": None if w.status == ST_NONE else STATUS_NAMES[w.status],
                      "tier": None, "anonymous": True, "active_before": 0, "active_after": 0,
                      "pending_before": 0, "pending_after": 0, "next_tier": None, "to_next_tier": None}
        else:
            next_tier = to_next = None
            if w.purchases_sum >= 0:
                metric = w.purchases_sum + t_pay
                held = self.tiers[w.tier].threshold if w.tier >= 0 else -1
                for k in range(self.n_tiers):
                    # above the metric and above the tier held (a Gold member whose metric fell is not
                    # shown Silver as the next step), as the reference reads ENGINE.md
                    if self.tiers[k].threshold > metric and self.tiers[k].threshold > held:
                        next_tier = self._tier_names[k]
                        to_next = self.tiers[k].threshold - metric
                        break
            member = {"card": card, "status": STATUS_NAMES[w.status],
                      "tier": None if w.tier < 0 else self._tier_names[w.tier], "anonymous": False,
                      "active_before": w.active_points, "active_after": w.active_points - w.applied,
                      "pending_before": w.pending_points, "pending_after": w.pending_points + accrued,
                      "next_tier": next_tier, "to_next_tier": to_next}
        return {"lines": lines, "totals": totals, "promotions": promotions, "hints": hints,
                "messages": messages, "member": member}


cdef bint _budgets_ok(object budgets):
    """budgets_used on the fast path: a plain dict of str -> int in 0..10^12."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef int64_t x
    if not c_is_dict(<PyObject*>budgets):
        return False
    while dnext(<PyObject*>budgets, &pos, &k, &v):
        if not c_is_str(k) or read_int(v, 0, MAX_MONEY, &x):
            return False
    return True
