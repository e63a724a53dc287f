"""The Python clients of the loyalty server::

    from loyalty.clients import LoyaltyClient, AsyncLoyaltyClient, LoyaltyError

``RPCS`` lists every RPC the clients call (by method name); ``build_request`` builds a request exactly as
the clients send it (see ``loyalty.clients.client``).
"""
from .client import RETRYABLE, AsyncLoyaltyClient, LoyaltyClient, make_channel, to_dict
from .errors import LoyaltyError
from .rpcs import RPCS, Rpc, build_request

__all__ = ["LoyaltyClient", "AsyncLoyaltyClient", "LoyaltyError", "RETRYABLE", "RPCS", "Rpc", "build_request",
           "make_channel", "to_dict"]
