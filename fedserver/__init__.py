"""The coordinator: gRPC service, round orchestration, aggregation, storage, CLI."""
