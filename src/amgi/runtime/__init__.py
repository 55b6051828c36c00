"""The AMGI runtime: everything a protocol server does apart from talking to its broker."""

from amgi.runtime.batch import BatchCall, CallCancelled, call_app, message_scope
from amgi.runtime.config import LifespanMode, RuntimeConfig
from amgi.runtime.lifespan import Lifespan
from amgi.runtime.metrics import BatchStats, MetricsHook
from amgi.runtime.server import Runtime

__all__ = [
    "BatchCall",
    "BatchStats",
    "CallCancelled",
    "Lifespan",
    "LifespanMode",
    "MetricsHook",
    "Runtime",
    "RuntimeConfig",
    "call_app",
    "message_scope",
]
