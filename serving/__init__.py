"""The gRPC ranking service (``feedrank serve``): contract in proto/feedrank/v1, see docs/serving.md."""
