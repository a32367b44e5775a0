"""Generated gRPC stubs of the `unmask.v1` contract (proto/unmask/v1/unmask.proto).

Do not edit the `unmask_pb2*` modules: regenerate them with `python scripts/gen_protos.py`.
Users should not need them either: `unmask.client` hides the stubs.
"""
