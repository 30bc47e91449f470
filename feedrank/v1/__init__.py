"""Generated gRPC stubs of the ``feedrank.v1`` contract (source: proto/feedrank/v1/ranking.proto).

Do not edit ``*_pb2*.py``: run ``python scripts/gen_proto.py``.
"""
