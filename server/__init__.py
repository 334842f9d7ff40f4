"""The gRPC server process: sessions, validation, encoding, metrics, workers."""
