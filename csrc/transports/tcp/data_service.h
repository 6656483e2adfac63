// The receive side of the TCP transport: serves a peer's WRITE and READ requests (for the
// listener, common/listener.h) straight into and out of registered memory.
#pragma once

#include <string>

#include "mooncake_vllm/region_registry.h"
#include "transports/common/wire.h"

namespace mooncake_vllm::tcp {

// Reads the request's entries and payload and answers it. Every range is checked (and leased)
// before a byte is written or read; READ needs regions registered with remote_read. Returns
// false when the connection must be closed (malformed request, I/O error).
bool serve_data_request(RegionRegistry& registry, int fd, const net::RequestHeader& req,
                        const std::string& peer);

}  // namespace mooncake_vllm::tcp
