"""The authenticated message channel every component speaks on (connector workers, store
nodes, the conductor's probes): versioned msgspec codecs and a ZMQ ROUTER/DEALER thread."""
