# Step 3: line discounts. effect_on is the table of docs/ENGINE.md step 3, what one discount promotion gives
# each line it takes; _discounts walks the eligible promotions in priority order or, for best_for_customer,
# sets the cascade of the non-exclusive ones against each exclusive alone, line by line.

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


cdef void _discounts(Engine self, Work* w) noexcept nogil:
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
