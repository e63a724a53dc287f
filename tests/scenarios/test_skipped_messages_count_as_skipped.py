"""A ``send`` step whose message is not sent (no address, not subscribed) moves the run on, but the
scenario's statistics count it as skipped, not completed: completed counts only messages actually queued."""
from __future__ import annotations

from helpers.scenarios import enroll, outbox

NEWS = """
id: news
triggers:
  - member_registered: {source: form}
steps:
  - id: hello
    send_email: {subject: "Hello {first_name}", body: "Welcome aboard."}
"""


def test_a_member_without_email_or_subscription_is_skipped_not_completed(scn):
    service, sc, worker = scn
    sc.define(NEWS)
    enroll(service, "7300001", email="anna@example.com", subs={"email": True})     # sent
    enroll(service, "7300002", email="", subs={"email": True})                     # no address
    enroll(service, "7300003", email="vera@example.com", subs={"email": False})    # not subscribed
    worker.run_until_idle()

    assert sorted(m["state"] for m in outbox(service.db, scenario_id="news")) == ["sent", "skipped", "skipped"]
    hello = {s["step"]: s for s in sc.stats("news")["steps"]}["hello"]
    assert (hello["entered"], hello["completed"], hello["skipped"], hello["failed"]) == (3, 1, 2, 0)
    assert sc.stats("news")["runs"]["done"] == 3       # a skipped message still finishes the run
