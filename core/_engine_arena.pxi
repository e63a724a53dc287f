# Per-call memory: everything one calculation needs lives in one Arena, a stack buffer in calculate's frame
# first and PyMem_Malloc blocks past it, released together in calculate's finally (as aiohttp's
# _http_writer.pyx does): the steps allocate from it and never free.

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
