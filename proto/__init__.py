"""magistream.v1 API: the .proto and its generated Python (make proto)."""
