"""Cluster mode: several reasonbroker nodes act as one over NATS JetStream (docs/cluster.md).

Imported only by `reasonbroker serve --cluster` (and its tests): nothing of it,
nor of nats-py, is loaded otherwise. wire.py names and encodes what the nodes
say through NATS; store.py is the client side's journal on the job stream;
bridge.py connects the node's two brokers to the cluster; node.py builds a node.
"""
