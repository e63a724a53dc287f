# The answer dict of docs/ENGINE.md, built from the finished Work record: the one place that makes Python
# objects per line (lines and their discounts, totals, the promotions applied, messages, the member), and
# the hints _run collected.

cdef object py128(int128_t v):
    """A Python int from a 128-bit one (points can pass 64 bits only on absurd programs)."""
    cdef int64_t hi
    cdef uint64_t lo
    if v >= -INT64_MAX and v <= INT64_MAX:
        return <int64_t>v
    hi = <int64_t>(v >> 64)
    lo = <uint64_t>(v & <int128_t>0xFFFFFFFFFFFFFFFF)
    return (int(hi) << 64) + int(lo)


cdef object _hint(Engine self, int32_t pi, str condition, int64_t missing, str message):
    return {"promotion": self._promo_ids[pi], "condition": condition, "missing": missing,
            "message": message}


cdef object _answer(Engine self, Work* w, list hints):
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
