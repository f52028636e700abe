"""One failure shared by several callers is raised as a copy for each."""

import grpc
from google.rpc import error_details_pb2

from meshgate.errors import MeshgateError


def test_a_copy_is_the_same_failure_in_a_new_object_with_its_own_metadata():
    detail = error_details_pb2.RetryInfo()
    error = MeshgateError(grpc.StatusCode.UNAVAILABLE, "REASON", "down", {"k": "v"}, "d.example", [detail])
    copy = error.copy()
    assert copy is not error
    assert copy.to_status_proto() == error.to_status_proto()
    copy.metadata["delivered_deltas"] = "3"
    assert error.metadata == {"k": "v"}, "a copy's metadata is its own"
