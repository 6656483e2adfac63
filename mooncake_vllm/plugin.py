"""vLLM general plugin entry point: makes `MooncakeVllmConnector` known to vLLM.

vLLM loads general plugins in every process it starts (API server, engine core, workers), so
`register()` runs many times per deployment and must be idempotent and cheap: it records a
lazy loader only; the connector module is imported when vLLM builds a connector.
"""

from __future__ import annotations

CONNECTOR_NAME = "MooncakeVllmConnector"
CONNECTOR_MODULE = "mooncake_vllm.connector.connector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # The factory raises on a second registration of the same name; a name already present
    # means this process ran register() before (or someone registered it for us).
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
