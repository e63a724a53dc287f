# Reading the request's Python values at C level: a dict lookup that counts None as absent (as inputs.py
# does), exact ints within limits, bools, interned ids, receipt.at (parse_at), a line's keys in one pass,
# and budgets_used. A reader only says valid or not and never raises: on any doubt the request goes to
# inputs.parse_request, which names the error.

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
