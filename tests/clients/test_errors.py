"""Client errors cross process lines as themselves (multiprocessing, Ray workers): pickled
by their fields, whatever their subclass's constructor takes."""

from __future__ import annotations

import pickle

import pytest

from slimserve.clients.errors import ClientError, InsecureToken, InvalidArgument, Overloaded


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("INVALID_ARGUMENT", "prompt: 900 tokens; the limit is 512"),
        Overloaded("RESOURCE_EXHAUSTED", "admission queue full"),
        InsecureToken("db.example.com:50051"),
    ],
)
def test_a_client_error_pickles_as_itself(error: ClientError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert (back.code, back.details, str(back)) == (error.code, error.details, str(error))
    assert back.__dict__ == error.__dict__
    if isinstance(error, InvalidArgument):
        assert back.field == "prompt"  # type: ignore[attr-defined]
