"""A newcomer's first script against the typed client: python examples/client_quickstart.py 127.0.0.1:50051"""
import sys
import uuid
from datetime import datetime, timezone

from loyalty.clients import LoyaltyClient, LoyaltyError

with LoyaltyClient(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051") as client:
    card = f"9{uuid.uuid4().int % 10**9:09d}"
    member = client.enroll_member(card=card, phone=f"+7999{card[-7:]}", source="api")
    receipt = {"store": "msk-01", "terminal": "pos-1", "number": f"qs-{card}", "at": datetime.now(timezone.utc)
               .isoformat(timespec="seconds"), "lines": [{"sku": "tea-1", "quantity": 2000, "price": 15000}]}
    quote = client.calculate_receipt(member={"card": card}, receipt=receipt)
    sale = client.confirm_purchase(member={"card": card}, receipt=receipt)
    refund = client.refund_purchase(purchase={"store": "msk-01", "terminal": "pos-1", "number": receipt["number"]},
                                    all_remaining=True, reason="changed my mind")
    print(f"member {member.member_id}: pays {quote.answer.totals.payable}, purchase {sale.purchase_id}, "
          f"refunded {refund.refunded_amount}")
    print("segments:", ", ".join(segment.id for segment in client.iter_segments(page_size=2)) or "none")
    try:
        client.get_member(member={"card": "no-such-card"})
    except LoyaltyError as err:
        print("as expected:", err.code.name, err.message)
