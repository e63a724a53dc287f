# Compiling a program, once per program version (Engine.__init__ calls these): C arrays out of Python
# lists, CSR indexes, interned ids, the local epoch of a validity bound, and the texts hints quote (only
# _money and _qty run per receipt, to word a hint).

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
