# cython: language_level=3
"""The compiled receipt core: docs/ENGINE.md on C structs and C integers.

``Engine(program)`` compiles a validated ``model.Program`` once into an immutable snapshot of C arrays
(declared in _engine.pxd); ``calculate`` decodes the request dicts on a fast path, runs the steps of SPEC
section 4 without Python objects per line, and builds the answer dict. Any anomaly in the request sends it
to ``loyalty.core.inputs.parse_request``, so errors are the reference's, word for word. Nothing here is
mutable after ``__init__``: many threads may share one Engine (the arithmetic runs without the GIL on
large receipts).
"""
cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF, PyObject
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memset

from loyalty.core.errors import InputError
from loyalty.core import inputs as _inputs

__all__ = ["Engine"]

cdef extern from "Python.h":
    PyObject* dget "PyDict_GetItemWithError"(PyObject* d, PyObject* k)   # no error state save/restore
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    int dnext "PyDict_Next"(PyObject* d, Py_ssize_t* pos, PyObject** k, PyObject** v)
    long long c_as_ll "PyLong_AsLongLongAndOverflow"(PyObject* o, int* overflow)
    int c_is_int "PyLong_CheckExact"(PyObject* o)
    int c_is_str "PyUnicode_CheckExact"(PyObject* o)
    int c_is_dict "PyDict_CheckExact"(PyObject* o)
    int c_is_list "PyList_CheckExact"(PyObject* o)
    Py_ssize_t c_list_len "PyList_GET_SIZE"(PyObject* o)
    PyObject* c_list_item "PyList_GET_ITEM"(PyObject* o, Py_ssize_t i)
    Py_ssize_t c_str_len "PyUnicode_GET_LENGTH"(PyObject* o)
    int c_str_kind "PyUnicode_KIND"(PyObject* o)
    void* c_str_data "PyUnicode_DATA"(PyObject* o)
    object PyList_New(Py_ssize_t n)
    void PyList_SET_ITEM(object lst, Py_ssize_t i, object o)
    PyObject* Py_True
    PyObject* Py_False
    PyObject* Py_None
    ctypedef struct PyTupleObject:
        PyObject* ob_item[1]

cdef extern from *:
    """
    #ifdef LOYALTY_DEBUG
    #include <stdio.h>
    #include <stdlib.h>
    #define LDBG_CHECK(cond) do { if (!(cond)) { \\
        fprintf(stderr, "loyalty core invariant failed: %s (%s:%d)\\n", #cond, __FILE__, __LINE__); \\
        abort(); } } while (0)
    #else
    #define LDBG_CHECK(cond) ((void)0)
    #endif
    """
    void LDBG_CHECK(bint cond) noexcept nogil
    int __builtin_ctzll(unsigned long long x) noexcept nogil

DEF STACK_WORDS = 2048             # 32 KiB of 16-byte words: a typical receipt's whole work area
DEF INSERTION_MAX = 24

cdef int64_t MAX_MONEY = 1000000000000
cdef int64_t MAX_POINTS = 1000000000000
cdef int64_t MAX_QUANTITY = 1000000000
cdef Py_ssize_t MAX_LINES = 1000
cdef int64_t ROOM_INF = (<int64_t>1) << 62

cdef object K_SKU = "sku"
cdef object K_QUANTITY = "quantity"
cdef object K_PRICE = "price"
cdef object K_AMOUNT = "amount"
cdef object K_EXTERNAL = "external_discount"
cdef object K_MIN_PRICE = "min_price"
cdef object K_NO_DISCOUNT = "no_discount"
cdef object K_NO_ACCRUAL = "no_accrual"
cdef object K_NO_REDEEM = "no_redeem"
cdef object K_CATEGORIES = "categories"
cdef object K_AT = "at"
cdef object K_LINES = "lines"
cdef object K_STORE = "store"
cdef object K_TERMINAL = "terminal"
cdef object K_NUMBER = "number"
cdef object K_CHANNEL = "channel"
cdef object K_COUPONS = "coupons"
cdef object K_REDEEM_POINTS = "redeem_points"
cdef object K_CARD = "card"
cdef object K_STATUS = "status"
cdef object K_TIER = "tier"
cdef object K_ACTIVE_POINTS = "active_points"
cdef object K_PENDING_POINTS = "pending_points"
cdef object K_AUDIENCES = "audiences"
cdef object K_USAGE = "usage"
cdef object K_PURCHASES_SUM = "purchases_sum"
cdef object K_DISCOUNTS = "discounts"
cdef object K_PAYABLE = "payable"
cdef object K_REDEEMED = "redeemed"
cdef object K_POINTS = "points"
cdef object K_PROMOTION = "promotion"
cdef dict LINE_TEMPLATE = {"sku": None, "amount": None, "external_discount": None, "discounts": None,
                           "payable": None, "redeemed": None, "points": None}
cdef dict DISCOUNT_TEMPLATE = {"promotion": None, "amount": None}
cdef tuple STATUS_NAMES = ("active", "restricted", "suspended", "blocked")
cdef object S_POS = "pos"

# The bodies, one concern a file, in the order a calculation travels. `include` is textual (as in asyncpg's
# protocol/protocol.pyx): one module and one C file, so no call crosses a module boundary. Cython allows
# `include` only at module level, so the steps that were Engine's cdef methods are cdef functions taking the
# Engine as `self` (declared in _engine.pxd); on a final class a method call was the same direct C call.
include "_engine_arith.pxi"        # min / max / room, 128-bit division, bit sets, stable sort, split
include "_engine_program.pxi"      # compiling a program into the snapshot (once), the texts hints quote
include "_engine_arena.pxi"        # per-call memory: a stack buffer, PyMem_Malloc past it
include "_engine_read.pxi"         # reading request values: ints, bools, parse_at, line keys, budgets
include "_engine_decode.pxi"       # step 1: the request dicts into a Work record
include "_engine_eligibility.pxi"  # step 2: which promotions apply, and to which lines
include "_engine_discounts.pxi"    # step 3: line discounts (the effects table, priority or best)
include "_engine_writeoff.pxi"     # steps 4-6: the cap, the write-off allocation, accrual
include "_engine_answer.pxi"       # the answer dict
include "_engine_class.pxi"        # the Engine: snapshot lifetime, calculate, the run through the steps
