"""Shared state backends.

Each feature that keeps state (idempotency records, rate-limit buckets, cached responses)
has one small interface with a ``memory`` implementation (one replica) and a ``redis`` one
(shared by replicas). This package holds what they share: the Redis connection.
"""
