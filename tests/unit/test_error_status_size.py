"""A status that echoes a caller's huge input still fits gRPC's trailers."""

import grpc

from meshgate.errors import error_info, not_found


def test_messages_and_metadata_that_echo_huge_input_are_clipped():
    alias = "東" * 1_000_000
    status = not_found("MODEL_NOT_FOUND", f"unknown model {alias!r}", model=alias).to_status()
    trailers = dict(status.trailing_metadata)
    # gRPC refuses trailers over 16 KiB in all (the message is percent-encoded on the wire).
    assert len(status.details.encode()) * 9 + len(trailers["grpc-status-details-bin"]) < 16_384
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert status.details.startswith("unknown model '東東") and status.details.endswith("…")


def test_short_messages_are_untouched():
    failure = not_found("SESSION_NOT_FOUND", "no such session", session_id="abc")
    status = failure.to_status()
    assert status.details == "no such session"

    class Carried:
        def trailing_metadata(self):
            return status.trailing_metadata

    assert dict(error_info(Carried()).metadata) == {"session_id": "abc"}
