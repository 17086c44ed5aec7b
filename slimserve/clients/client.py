"""The clients' former single module, kept so `slimserve.clients.client.Client`,
`tls_credentials` and `channel_target` still import; new code imports `slimserve.clients`.

Re-exports only; imports nothing outside `slimserve.clients`.
"""

from slimserve.clients._base import tls_credentials
from slimserve.clients._convert import Prompt
from slimserve.clients._target import channel_target
from slimserve.clients.aio import AsyncClient
from slimserve.clients.sync import Client

__all__ = ["AsyncClient", "Client", "Prompt", "channel_target", "tls_credentials"]
