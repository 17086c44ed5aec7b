"""The KServe v2 / Open Inference Protocol door: Triton's `inference.GRPCInferenceService`
(health, metadata, ModelInfer, ModelStreamInfer) beside `slimserve.v1` on the same port.

`signature` reads the tensors (named as Triton's vLLM backend names them) into slimserve
requests, `tensors` decodes and encodes KServe tensors, `servicer` answers through the
`GenerationServicer`. See docs/kserve.md.
"""

from slimserve.server.kserve.servicer import SERVICE_NAME, InferenceServicer, RequestFailed

__all__ = ["SERVICE_NAME", "InferenceServicer", "RequestFailed"]
