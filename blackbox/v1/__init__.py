"""The protocol both sides stand on: the generated gRPC code (`backbone_pb2*`, from
protos/blackbox/v1/backbone.proto), arrays on the wire (`wire`) and the description of
a delta (`delta_spec`). It imports neither the client nor the server, and no torch."""
