# Step 1: the request dicts into a Work record (lines as CLine structs in the arena, receipt and member facts
# as C scalars and bitmaps), validated on the way. An anomaly returns 1, and Engine.calculate asks
# inputs.parse_request; should that accept the request, _receipt_dict and _member_dict give its normalised
# form to decode again.

cdef int _decode(Engine self, object receipt, object member, Work* w, Arena* a, int64_t* at_out,
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
