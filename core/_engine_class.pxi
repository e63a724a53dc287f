# The Engine: the lifetime of its snapshot (__cinit__ and __dealloc__ own every PyMem_Malloc array,
# __init__ compiles the program), calculate (the arena, step 1, the reference's parser on an anomaly) and
# _run, which takes a decoded receipt through steps 2-6 to the answer. Its attributes are declared in
# _engine.pxd.

@cython.final
cdef class Engine:
    """A program compiled for the core. ``calculate(receipt, member=None, budgets_used=None) -> dict``."""

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
            rc = _decode(self, receipt, member, &w, &arena, &at, &store, &chan, coupons, auds)
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
                rc = _decode(self, receipt, member, &w, &arena, &at, &store, &chan, coupons, auds)
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
                mask = _check(self, pi, w, at, store, chan, coupons, auds, gqty, bud)
                if mask == 0:
                    E += 1                  # stays in cand
                elif mask == FAIL_TOTAL or mask == FAIL_GQ:
                    p = &self.promos[pi]
                    if not p.is_discount and w.anonymous:
                        pass
                    elif mask == FAIL_TOTAL:
                        missing = p.total - T
                        if 0 < missing <= <int64_t>(<int128_t>p.total * within // 10000):
                            hints.append(_hint(self, pi, "receipt_total_at_least", missing,
                                                    f"add {_money(missing)} to get {self._effect_texts[pi]}"))
                    else:
                        missing = p.gq_quantity - gqty[p.gq_group]
                        if 0 < missing <= <int64_t>(<int128_t>p.gq_quantity * within // 10000):
                            hints.append(_hint(self, 
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
                _discounts(self, w)
                _writeoff_accrual(self, w)
        else:
            _discounts(self, w)
            _writeoff_accrual(self, w)
        return _answer(self, w, hints)
