# Steps 4-6: the write-off cap (the program's, the tier's, the reduced caps of a receipt with external
# discounts), the allocation of the points written off over the redeemable lines, and accrual (tier rate,
# multipliers, extra percent, fixed extra points), with the largest remainder wherever a total is shared.

cdef void _writeoff_accrual(Engine self, Work* w) noexcept nogil:
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
