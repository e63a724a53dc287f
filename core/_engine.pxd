# C declarations of the compiled receipt core: its C types, the Engine's attributes and the steps of a
# calculation (bodies in _engine.pyx and the _engine_*.pxi files it includes; semantics in docs/ENGINE.md).
#
# Cython reads this file as the declarations of `loyalty.core._engine` because it finds it by that module
# name, at loyalty/core/_engine.pxd on its include path. The source tree keeps the package in core/
# (setup.py's package_dir), so setup.py makes that path a link to core/ under build/ and passes it as
# cythonize's include_path.
#
# A program is compiled once into the C data below: promotions in promotion order (priority desc, id asc)
# as an array of CPromo, every list a promotion carries as an (offset, count) slice of one int32 pool,
# strings interned to integer ids, scopes indexed (CSR arrays: id -> promotions) so that a receipt only
# looks at the promotions its lines can reach. A receipt is decoded into CLine structs and a Work record
# whose arrays live on a stack buffer (PyMem_Malloc past it); the arithmetic then runs without the GIL.
cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint64_t

cdef extern from *:
    # gcc's __int128: products of ENGINE.md (splits, accrual, nth_free) exceed 64 bits. Cython has no name
    # for it, so it is declared under a C name override; never convert one to Python directly (py128 does).
    ctypedef long long int128_t "__int128"


cdef enum EffectKind:
    EK_PERCENT_OFF = 0
    EK_AMOUNT_OFF = 1
    EK_FIXED_PRICE = 2
    EK_NTH_FREE = 3
    EK_POINTS_MULTIPLIER = 4
    EK_EXTRA_POINTS_PERCENT = 5
    EK_EXTRA_POINTS = 6


cdef enum CardStatus:
    ST_ACTIVE = 0
    ST_RESTRICTED = 1
    ST_SUSPENDED = 2
    ST_BLOCKED = 3
    ST_NONE = 4                      # no member: anonymous


cdef enum Stacking:
    STACK_PRIORITY = 0
    STACK_BEST = 1


cdef enum FailBits:                  # why a promotion is not eligible (step 2)
    FAIL_OTHER = 1
    FAIL_TOTAL = 2                   # only when.receipt_total_at_least
    FAIL_GQ = 4                      # only when.group_quantity_at_least


ctypedef struct Slice:
    int32_t off
    int32_t n


ctypedef struct CPromo:
    int32_t kind                     # EffectKind
    bint is_discount
    bint per_receipt                 # amount_off / extra_points per receipt
    bint exclusive
    bint scope_all                   # no include lists
    int64_t value                    # bp, minor units, N, hundredths or points (model.Effect.value)
    bint has_starts
    bint has_ends
    int64_t starts                   # local epoch seconds, inclusive
    int64_t ends                     # local epoch seconds, exclusive
    int32_t weekdays                 # bit d set for Monday = 1 .. Sunday = 7; 0: every day
    Slice hours                      # pairs (start_s, end_s) in Engine.pool
    Slice stores
    Slice channels
    Slice aud_include
    Slice aud_exclude
    Slice tiers                      # tier ids (index in program.tiers.levels; unknown names past them)
    bint has_total
    int64_t total                    # when.receipt_total_at_least
    int32_t gq_group                 # -1, or index of the condition group (Engine.gq_*)
    int64_t gq_quantity
    int32_t coupon                   # -1, or coupon id
    int64_t uses                     # -1, or limits.uses_per_member
    int64_t budget                   # -1, or min(discount_budget, points_budget) of those set


ctypedef struct CTier:
    int64_t threshold
    int64_t accrual_bp
    int64_t redeem_max_bp            # -1: not set


ctypedef struct CLine:
    int64_t quantity
    int64_t amount
    int64_t external
    int64_t min_price
    int64_t base
    int64_t floor                    # ENGINE.md floor_i
    int64_t cur                      # current amount in the walk / cascade
    int64_t disc                     # loyalty discount so far (final after stacking)
    int64_t units                    # quantity / 1000 for piece lines, else 0
    int64_t payable
    int64_t redeemed
    int128_t points
    int64_t rate_bp
    int64_t mult
    int128_t n                       # accrual numerator m_i x rate x mult
    int32_t sku                      # interned id, -1: unknown to the program
    int32_t cat_off                  # slice of Work.cats (known category ids only)
    int32_t cat_n
    bint no_discount
    bint no_accrual
    bint no_redeem
    bint ended                       # priority walk ended by an exclusive


ctypedef struct Arena:               # per-call memory: a stack buffer, PyMem_Malloc blocks past it
    char* buf
    size_t cap
    size_t used
    void* blocks[64]
    int nblocks


ctypedef struct Work:                # everything one calculation needs, owned by its Arena
    int32_t L
    CLine* lines
    int32_t* cats
    int32_t E                        # eligible promotions, in promotion order
    int32_t* elig                    # promotion index of each
    char* insc                       # E x L: line in the promotion's scope
    int64_t* dmat                    # E x L: discount given (discount promotions)
    char* used                       # E: promotion applied (listed in the answer)
    int32_t* drows                   # E: the discount promotions that gave some line more than zero
    # split / sort scratch, L each
    int64_t* sw
    int64_t* sroom
    int64_t* sout
    int128_t* skey
    int32_t* sidx
    int32_t* sorder
    int32_t* stmp
    char* sact
    char* take                       # L: line takes the promotion being computed
    int64_t* scur
    int64_t* sbase
    # receipt and member facts (borrowed objects live in the request dicts)
    PyObject** skus                  # L: each line's sku string
    int64_t total                    # T = sum(base)
    int32_t wd                       # weekday of `at`, Monday = 1
    int32_t sod                      # second of the day of `at`
    int32_t status                   # CardStatus
    bint anonymous                   # no member, or suspended / blocked
    int32_t tier                     # member's tier index, -1: none
    int64_t active_points
    int64_t pending_points
    int64_t purchases_sum            # -1: not given
    int64_t redeem_points
    PyObject* card                   # NULL: not given
    PyObject* usage                  # NULL: none (or anonymous)
    # results
    int64_t max_points
    int64_t applied


@cython.final
cdef class Engine:
    cdef readonly object program
    cdef object _parse_request
    cdef object _parse_budgets_used
    cdef dict _sku_ids
    cdef dict _cat_ids
    cdef dict _aud_ids
    cdef dict _tier_ids
    cdef dict _store_ids
    cdef dict _chan_ids
    cdef dict _coupon_ids
    cdef tuple _promo_ids            # str id of each promotion, in promotion order
    cdef tuple _effect_texts         # hint texts ("20% off")
    cdef tuple _gq_names             # group name of each condition group
    cdef tuple _tier_names
    # program scalars
    cdef int64_t point_value
    cdef int32_t stacking
    cdef bint on_redeemed_part
    cdef int64_t redeem_max_bp
    cdef int64_t min_payable
    cdef int64_t max_discount_bp
    cdef int64_t hint_within_bp
    cdef int32_t n_reduced
    cdef int64_t* reduced            # pairs (over_bp, max_bp)
    cdef int32_t n_tiers
    cdef CTier* tiers
    cdef int32_t n_aud
    cdef int32_t n_coupons
    # promotions
    cdef int32_t P
    cdef CPromo* promos
    cdef int32_t* pool
    cdef int32_t n_all
    cdef int32_t* all_scope          # promotions with scope all
    # scope indexes, CSR: off[id] .. off[id + 1] in the items array
    cdef int32_t n_skus
    cdef int32_t n_cats
    cdef int32_t* sku_inc_off
    cdef int32_t* sku_inc
    cdef int32_t* cat_inc_off
    cdef int32_t* cat_inc
    cdef int32_t* sku_exc_off
    cdef int32_t* sku_exc
    cdef int32_t* cat_exc_off
    cdef int32_t* cat_exc
    # group_quantity_at_least: condition groups, their members, their promotions
    cdef int32_t G
    cdef int32_t* sku_grp_off
    cdef int32_t* sku_grp
    cdef int32_t* cat_grp_off
    cdef int32_t* cat_grp
    cdef int32_t* grp_promo_off
    cdef int32_t* grp_promo
    cdef int32_t n_gq
    cdef int32_t* gq_promos          # every promotion with a group condition
    # receipt_total_at_least, sorted by value for hints
    cdef int32_t n_tot
    cdef int64_t* tot_vals
    cdef int32_t* tot_promos

    cdef object _run(self, Work* w, Arena* a, int64_t at, int32_t store, int32_t chan, uint64_t* coupons,
                     uint64_t* auds, object budgets)


# The steps of a calculation, which read the Engine's snapshot; bodies in the .pxi file of each step. They
# were the Engine's cdef methods, and are declared here as those were in its class: declared in the module's
# .pxd, a function is exported in its C API as a method was in the vtable, so gcc keeps each one a function
# of its own (inlining _check into Engine._run measured 6% slower on 200-line receipts, 1,000 promotions).
cdef int _decode(Engine self, object receipt, object member, Work* w, Arena* a, int64_t* at_out,
                 int32_t* store, int32_t* chan, uint64_t* coupons, uint64_t* auds) except -2
cdef int32_t _check(Engine self, int32_t pi, const Work* w, int64_t at, int32_t store, int32_t chan,
                    const uint64_t* coupons, const uint64_t* auds, const int64_t* gqty,
                    PyObject* budgets) noexcept
cdef void _discounts(Engine self, Work* w) noexcept nogil
cdef void _writeoff_accrual(Engine self, Work* w) noexcept nogil
cdef object _hint(Engine self, int32_t pi, str condition, int64_t missing, str message)
cdef object _answer(Engine self, Work* w, list hints)
