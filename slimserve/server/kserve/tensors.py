"""KServe v2 tensors ↔ Python values, for the two datatypes the LLM signature uses.

An input arrives either as typed `contents` or, as tritonclient sends it, in the request's
`raw_input_contents` (one entry per input, in order; the protocol allows one way or the
other per request, never both). Raw BYTES is each element as a 4-byte little-endian length
followed by its bytes; raw BOOL is one byte per element. Outputs go back raw, as Triton
sends them: BYTES length-prefixed, FP64 as little-endian doubles.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from slimserve.engine.errors import InvalidRequest
from slimserve.v1.inference import grpc_service_pb2 as pb

BYTES = "BYTES"
BOOL = "BOOL"
FP64 = "FP64"

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded input: BYTES elements are `bytes`, BOOL elements `bool`."""

    name: str
    datatype: str
    values: tuple[bytes, ...] | tuple[bool, ...]


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Every input of `request` by name. Raises InvalidRequest naming the bad input."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            "raw_input_contents",
            f"has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send every input raw or none",
        )
    out: dict[str, Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{tensor.name or i}]"
        if tensor.name in out:
            raise InvalidRequest(field, "is given twice")
        count = _element_count(field, tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(field, "has contents, but the request is sent raw")
            values = _from_raw(field, tensor.datatype, raw[i])
        else:
            values = _from_contents(field, tensor.datatype, tensor.contents)
        if len(values) != count:
            raise InvalidRequest(
                field, f"shape {list(tensor.shape)} holds {count} elements; got {len(values)}"
            )
        out[tensor.name] = Tensor(tensor.name, tensor.datatype, values)
    return out


def _element_count(field: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidRequest(field, f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def _from_raw(field: str, datatype: str, data: bytes) -> tuple[bytes, ...] | tuple[bool, ...]:
    if datatype == BOOL:
        if any(b > 1 for b in data):
            raise InvalidRequest(field, "raw BOOL bytes must be 0 or 1")
        return tuple(bool(b) for b in data)
    if datatype == BYTES:
        return _split_bytes(field, data)
    raise InvalidRequest(field, f"datatype {datatype!r} is not BYTES or BOOL")


def _split_bytes(field: str, data: bytes) -> tuple[bytes, ...]:
    elements, at = [], 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise InvalidRequest(field, "raw BYTES ends inside an element's 4-byte length")
        (n,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + n > len(data):
            raise InvalidRequest(field, f"raw BYTES element of {n} bytes runs past the end")
        elements.append(data[at : at + n])
        at += n
    return tuple(elements)


def _from_contents(
    field: str, datatype: str, contents: pb.InferTensorContents
) -> tuple[bytes, ...] | tuple[bool, ...]:
    if datatype == BOOL:
        return tuple(contents.bool_contents)
    if datatype == BYTES:
        return tuple(contents.bytes_contents)
    raise InvalidRequest(field, f"datatype {datatype!r} is not BYTES or BOOL")


def join_bytes(values: Sequence[bytes]) -> bytes:
    """Raw BYTES: each element length-prefixed (4 bytes, little-endian)."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)


def bytes_output(
    name: str, values: Sequence[bytes]
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A BYTES output of shape [len(values)] and its raw contents."""
    meta = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=BYTES, shape=[len(values)])
    return meta, join_bytes(values)


def fp64_output(
    name: str, values: Sequence[float]
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """An FP64 output of shape [len(values)] and its raw contents (little-endian)."""
    meta = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=FP64, shape=[len(values)])
    return meta, struct.pack(f"<{len(values)}d", *values)
