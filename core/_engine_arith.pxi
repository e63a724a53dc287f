# The integer arithmetic of docs/ENGINE.md, on C integers and without the GIL: min, max and the room above
# a floor; 128-bit division that stays a 64-bit one when it can; bit sets; a stable sort (insertion below
# INSERTION_MAX lines, merge above); and split, the largest-remainder allocation that step 3 (amount_off
# per receipt), step 5 (the write-off) and step 6 (fixed extra points) share.

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
