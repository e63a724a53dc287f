"""The publishing use case stores no version for a file identical to the live one (line endings, spaces at
line ends and blank lines at the end aside): it answers the live version marked ``unchanged`` and switches
nothing. Any other change, a comment included, is the next version."""
from __future__ import annotations

from helpers.storage import DEMO_PROGRAM
from loyalty.v1 import admin_pb2


def publish(service, text, comment=""):
    return service.publish_program(admin_pb2.PublishProgramRequest(yaml=text, comment=comment))


def versions(service):
    return [v.version for v in service.list_program_versions(admin_pb2.ListProgramVersionsRequest()).versions]


def test_the_live_text_again_is_the_live_version_unchanged(service):
    live = service.get_program(admin_pb2.GetProgramRequest())
    again = publish(service, DEMO_PROGRAM, comment="once more")
    assert (again.version, again.unchanged, again.current, again.checksum, again.comment) == (
        live.version, True, True, live.checksum, live.comment)
    assert versions(service) == [1] and service.programs.current().version == 1


def test_line_endings_and_trailing_spaces_are_not_a_change(service):
    resaved = DEMO_PROGRAM.replace("\n", " \r\n") + "\r\n\r\n"
    assert publish(service, resaved).unchanged
    assert versions(service) == [1]


def test_a_comment_or_a_value_is_a_change(service):
    commented = publish(service, DEMO_PROGRAM + "\n# v2\n")
    assert (commented.version, commented.unchanged) == (2, False)
    back = publish(service, DEMO_PROGRAM)                    # the old text is not the live one any more
    assert (back.version, back.unchanged) == (3, False)
    assert versions(service) == [3, 2, 1]
