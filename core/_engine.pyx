# placeholder: replaced by the compiled core
cdef class Engine:
    pass
