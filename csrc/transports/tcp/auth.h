// Cluster-token challenge: the server sends a random nonce, the client answers
// HMAC-SHA256(token, nonce); a connection that cannot answer is refused before any request.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "socket_io.h"

namespace mooncake_vllm::tcp {

std::array<uint8_t, 32> hmac_sha256(const std::string& key, const uint8_t* data, size_t len);

// Server side of the handshake. Returns an empty string when accepted, else why not.
std::string server_handshake(int fd, const std::string& token, double timeout_s);
// Client side. Throws TransferError naming the endpoint when refused or unreachable.
void client_handshake(int fd, const std::string& endpoint, const std::string& token,
                      double timeout_s);

}  // namespace mooncake_vllm::tcp
