"""The longest text each field may hold: one figure per kind of field, read by the validation
(``members.check_text`` and its callers, the receipt checks of ``convert`` / ``processing.common``), by the
compiled decoder (``_wire.pyx`` applies the same figures to UTF-8 bytes to say a receipt already fits) and by
the columns of ``models`` that store the field. Lengths are in characters; a limit here is a promise that
storage takes the text, so a column never holds less than the validation lets through.
"""
from __future__ import annotations

__all__ = ["ID_LIMIT", "AT_LIMIT", "KEY_LIMIT", "NAME_LIMIT", "EMAIL_LIMIT", "DATE_LIMIT", "REASON_LIMIT",
           "CUSTOM_NAME_LIMIT", "CUSTOM_VALUE_LIMIT", "CODE_LIMIT", "MAX_COUPONS", "MAX_CATEGORIES"]

# Identifiers a till or a provider sends: card numbers, store / terminal / receipt number, line sku, the id of
# a provider's message event.
ID_LIMIT = 64
# A time as the POS sent it (``receipt.at``, ``registered_at``): ISO 8601 with fractions and an offset.
AT_LIMIT = 40
# Idempotency keys a caller chooses: ``request_id``, ``operation_id``, ``refund_id``.
KEY_LIMIT = 100
# Profile names: first name, last name, city.
NAME_LIMIT = 100
# An email address (RFC 5321's longest path).
EMAIL_LIMIT = 254
# A date as ``YYYY-MM-DD``.
DATE_LIMIT = 10
# The longest free-text reason (adjustments, refunds, cancels, card status changes, batch actions) kept in the
# ledger and the audit trail: a sentence or two for the operator who reads it later, not a document.
REASON_LIMIT = 500
# Custom profile fields: names as long as a segment condition accepts (``custom: {pet: cat}``), values a short
# text (they are read with every member).
CUSTOM_NAME_LIMIT = 100
CUSTOM_VALUE_LIMIT = 1000
# The codes a receipt carries that are matched, not stored: its channel, a coupon code, a line's category (a
# retailer's category path included), and how many a receipt or a line may carry.
CODE_LIMIT = 100
MAX_COUPONS = 100
MAX_CATEGORIES = 100
