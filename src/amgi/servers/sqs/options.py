"""The options of the SQS server: one ``--kebab-case`` flag per field."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Final

from amgi.options import invalid

logger = logging.getLogger("amgi.servers.sqs")

SQSClient = Any
"""The aiobotocore SQS client (untyped: the library ships no stubs)."""

__all__ = ["AWS_DEFAULT_ENDPOINT", "SqsOptions"]


@dataclass(slots=True)
class SqsOptions:
    """Options of the SQS server."""

    endpoint_url: str = field(
        default="http://127.0.0.1:5000",
        metadata={"help": "SQS endpoint; '' or 'aws' for AWS's own (or AWS_ENDPOINT_URL_SQS)"},
    )
    region: str | None = field(
        default=None,
        metadata={"help": "AWS region (default: AWS_REGION, the profile, else us-east-1)"},
    )
    profile: str | None = field(
        default=None, metadata={"help": "AWS profile for credentials (default: the standard chain)"}
    )
    wait_time: int = field(
        default=20,
        metadata={
            "ge": 0,
            "le": 20,
            "help": "long-poll seconds per receive (0-20; 0: short polls, 1 s apart while idle)",
        },
    )
    max_messages: int = field(
        default=10, metadata={"ge": 1, "le": 10, "help": "messages per receive (1-10)"}
    )
    receivers: int = field(
        default=2, metadata={"ge": 1, "help": "receive calls in flight per queue"}
    )
    visibility_timeout: int = field(
        default=30,
        metadata={
            "ge": 1,  # 0 hides nothing: every poll would take the messages in flight
            "le": 43200,
            "help": "seconds a received message stays hidden; extended while in flight",
        },
    )
    dead_letter_suffix: str = field(
        default="-dlq",
        metadata={"help": "dead-letter queue name suffix for queues without a redrive policy"},
    )
    connect_timeout: float = field(
        default=5.0, metadata={"gt": 0, "help": "seconds to wait for a connection to the endpoint"}
    )

    def check_together(self) -> None:
        """The dead-letter suffix names another queue: not empty (the queue itself, whose
        dead letters would come straight back), only characters SQS takes in a name."""
        if not _QUEUE_NAME_PART.fullmatch(self.dead_letter_suffix):
            raise invalid(
                self,
                "dead_letter_suffix",
                "must be 1 to 80 letters, digits, hyphens or underscores",
            )


_QUEUE_NAME_PART: Final = re.compile(r"[A-Za-z0-9_-]{1,80}")

AWS_DEFAULT_ENDPOINT: Final = ("", "aws")
