"""The chunk scheduler: MAGI-1 window, cross-session batching, admission, KV cache."""
