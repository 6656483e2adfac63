// RDMA transport: RC queue pairs per (local NIC, peer) lane, set up through a handshake on the
// peer's TCP listener; RDMA WRITE/READ work requests sliced, striped across NICs and posted in
// chains with one signalled WR per chain; a completion-polling thread.
#pragma once

#include <memory>
#include <string>

#include "mooncake_vllm/region_registry.h"
#include "mooncake_vllm/transport.h"

namespace mooncake_vllm::rdma {

// True when the configured verbs provider shows at least one usable device; otherwise `why`
// says what is missing.
bool rdma_usable(const EngineConfig& config, std::string* why);

std::unique_ptr<Transport> make_rdma_transport(RegionRegistry& registry, const EngineConfig& config);

}  // namespace mooncake_vllm::rdma
