"""Serverless adapters: the same AMGI app as a Lambda function.

``handler = SqsHandler(app)`` (SQS event source) or ``handler = KafkaHandler(app)`` (MSK
or self-managed Kafka), then point the function at ``module.handler``. Every invocation
runs the app through the runtime's own batch call; lifespan runs once per container.
"""

from amgi.serverless._adapter import BatchFailed, LambdaAdapter, LambdaContext, MalformedEvent
from amgi.serverless.kafka import KafkaHandler
from amgi.serverless.sqs import SqsHandler

__all__ = [
    "BatchFailed",
    "KafkaHandler",
    "LambdaAdapter",
    "LambdaContext",
    "MalformedEvent",
    "SqsHandler",
]
