"""The OpenAI-compatible HTTP door: `/v1/completions`, `/v1/chat/completions`,
`/v1/responses`, `/v1/models`, `/health/live` and `/health/ready`, served by uvicorn on the
gRPC server's asyncio loop, over the same engines, limits, tokens, metrics and access log.

`OpenAIApp` holds the routes (`app.py`), `HttpDoor` runs them (`door.py`); request
bodies are parsed in `schema.py`, answers built in `responses.py` and `responses_api.py`,
streamed by `stream.py`; errors take the HTTP column of `server.errors`.
"""

from slimserve.server.openai.app import OpenAIApp
from slimserve.server.openai.door import HttpDoor

__all__ = ["HttpDoor", "OpenAIApp"]
