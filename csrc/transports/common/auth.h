// Mutual cluster-token authentication, the first exchange on every listener connection.
//
//   server -> Hello   {server nonce, auth required?}
//   client -> Auth    {client nonce, HMAC(token, "mooncake-vllm/2 client" 0 sn cn)}
//   server -> Verdict {status, HMAC(token, "mooncake-vllm/2 server" 0 sn cn)}
//
// Each side proves it knows the token over a nonce the other side chose, so neither proof can
// be replayed; the two directions use different labels, so a client's proof can never be sent
// back to it as the server's. A client with a token refuses a server that does not ask for
// one, and sends no request before the server's proof checked out.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "socket_io.h"

namespace mooncake_vllm::net {

std::array<uint8_t, 32> hmac_sha256(const std::string& key, const uint8_t* data, size_t len);

// The proof of `role` ("client" or "server") for one handshake.
std::array<uint8_t, 32> handshake_mac(const std::string& token, const char* role,
                                      const uint8_t* server_nonce, const uint8_t* client_nonce);

// Server side of the handshake. Returns an empty string when accepted, else why not.
std::string server_handshake(int fd, const std::string& token, double timeout_s);
// Client side. Throws TransferError naming the endpoint when refused, unreachable, or when the
// server could not prove it knows the token.
void client_handshake(int fd, const std::string& endpoint, const std::string& token,
                      double timeout_s);

}  // namespace mooncake_vllm::net
