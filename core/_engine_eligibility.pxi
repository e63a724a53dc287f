# Step 2: whether a promotion applies to this receipt (_check: dates, hours, store, channel, audiences,
# tier, coupon, uses, budget, and the receipt-level conditions a hint can name) and which lines each
# eligible promotion reaches (mark_scope, over the snapshot's scope indexes). Engine._run picks the
# candidates and calls both.

cdef int32_t _check(Engine self, int32_t pi, const Work* w, int64_t at, int32_t store, int32_t chan,
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


cdef inline void mark_scope(char* insc, const int32_t* pe, const int32_t* off, const int32_t* idx, int32_t key,
                            int32_t i, int32_t L, char value) noexcept nogil:
    """Set line ``i`` in (1) or out of (0) the scope of every eligible promotion the index lists for ``key``
    (``pe`` maps a promotion to its eligible row, -1 when not eligible)."""
    cdef int32_t j, e
    for j in range(off[key], off[key + 1]):
        e = pe[idx[j]]
        if e >= 0:
            insc[<size_t>e * L + i] = value
