"""The OpenAI-compatible HTTP door: `/v1/completions`, `/v1/chat/completions`,
`/v1/models`, `/health/live` and `/health/ready`, served by uvicorn on the gRPC server's
asyncio loop, over the same engines, limits, tokens, metrics and access log.

`OpenAIApp` holds the routes (`app.py`), `HttpDoor` runs them (`door.py`); request
bodies are checked in `schema.py`, answers built in `responses.py`, streamed by
`stream.py`, and errors mapped to statuses by the one table in `errors.py`.
"""

from slimserve.server.openai.app import OpenAIApp
from slimserve.server.openai.door import HttpDoor
from slimserve.server.openai.errors import STATUS

__all__ = ["STATUS", "HttpDoor", "OpenAIApp"]
