"""The options of the AMQP server: one ``--kebab-case`` flag per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from amgi.servers.kit import invalid, userinfo_problem

__all__ = ["AmqpOptions"]


@dataclass(slots=True)
class AmqpOptions:
    """Options of the AMQP server."""

    url: str = field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        repr=False,
        metadata={"help": "broker URL, amqp://user:password@host:port/vhost", "secret": True},
    )
    prefetch: int = field(
        default=1000,
        metadata={"ge": 1, "le": 65535, "help": "unacknowledged deliveries per queue (basic.qos)"},
    )
    batch_size: int = field(default=100, metadata={"ge": 1, "help": "most messages per batch"})
    linger: float = field(
        default=0.002,
        metadata={"ge": 0, "help": "seconds to wait for a fuller batch once one arrived"},
    )
    queue_type: Literal["classic", "quorum"] = field(
        default="classic", metadata={"help": "type of declared queues: classic or quorum"}
    )
    durable: bool = field(default=True, metadata={"help": "declare durable queues/exchange"})
    passive: bool = field(
        default=False,
        metadata={"help": "only check that the queues and exchange exist, declare nothing"},
    )
    exchange: str = field(
        default="",
        metadata={"help": "exchange to bind the queues to and publish to (default exchange)"},
    )
    exchange_type: str = field(
        default="direct", metadata={"help": "type of the exchange: direct, topic, fanout ..."}
    )
    routing_keys: list[str] = field(
        default_factory=list,
        metadata={"help": "binding keys of the queues on the exchange (default: queue name)"},
    )
    dead_letter_exchange: str = field(
        default="amgi.dead-letter",
        metadata={"help": "exchange receiving dead letters, routed by their queue name"},
    )
    connect_timeout: float = field(
        default=10.0,
        metadata={
            "gt": 0,
            "help": "seconds to connect, and for each answer of the broker while declaring "
            "the queues and starting to consume (at each reconnect too)",
        },
    )
    confirm_timeout: float = field(
        default=30.0, metadata={"gt": 0, "help": "seconds to wait for a publish confirm"}
    )
    retry_refused_for: float = field(
        default=300.0,
        metadata={
            "ge": 0,
            "help": "seconds a retry queue may refuse a message's retry copy (basic.nack: "
            "full with overflow reject-publish) before the message is dead-lettered",
        },
    )
    reconnect_delay_max: float = field(
        default=5.0,
        metadata={"gt": 0, "help": "longest pause between reconnection attempts, seconds"},
    )

    def check_together(self) -> None:
        """Quorum queues exist only durable; binding keys need an exchange (queues cannot
        be bound to the default exchange); names and keys are AMQP short strings."""
        problem = userinfo_problem(self.url)
        if problem:
            raise invalid(self, "url", problem)
        if self.queue_type == "quorum" and not self.durable:
            raise invalid(self, "durable", "cannot be off for quorum queues")
        if self.routing_keys and not self.exchange:
            raise invalid(self, "routing_keys", "needs --exchange (the default exchange has none)")
        for name, values in (
            ("exchange", [self.exchange]),
            ("dead_letter_exchange", [self.dead_letter_exchange]),
            ("routing_keys", self.routing_keys),
        ):
            if any(len(v.encode()) > 255 for v in values):
                raise invalid(self, name, "must be at most 255 bytes (UTF-8)")
