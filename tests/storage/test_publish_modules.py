"""Publishing a program file whose `segments:` or `scenarios:` are bad publishes nothing: the error names the
path in the file, and the current version stays what it was."""
from __future__ import annotations

import pytest

from helpers.storage import DEMO_PROGRAM
from loyalty.server.errors import InvalidArgument
from loyalty.v1 import admin_pb2

BAD_SCENARIO = """
scenarios:
  - id: welcome
    triggers: [{type: member_registered}]
    steps:
      - {id: hello, type: teleport}
"""

BAD_SEGMENT = """
segments:
  - id: rich
    type: updatable
    conditions: {points: {active: {gte: "a lot"}}}
"""


@pytest.mark.parametrize("tail, path_start", [(BAD_SCENARIO, "scenarios[0].steps[0]"),
                                              (BAD_SEGMENT, "segments[0].conditions")])
def test_a_bad_module_definition_publishes_nothing(service, tail, path_start):
    before = service.get_program(admin_pb2.GetProgramRequest()).version
    with pytest.raises(InvalidArgument) as err:
        service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM + tail))
    assert err.value.path.startswith(path_start), err.value.path
    assert service.get_program(admin_pb2.GetProgramRequest()).version == before
