"""Python SDK and the magi-client CLI (depends only on proto, grpcio, protobuf, av)."""
