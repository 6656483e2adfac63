// Request/response framing helpers shared by the listener, the TCP links and CONTROL clients.
// Every length read here is checked against its limit (wire.h) before anything is read for it.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "wire.h"

namespace mooncake_vllm::net {

// Sends one response: header, error text (cut to kMaxErrorBytes), then `payload`. Returns an
// empty string on success, else the cause.
std::string send_response(int fd, uint64_t seq, const std::string& error,
                          const std::vector<iovec>& payload);

// Reads a response header and its error text. Returns an empty string on success, else the
// cause (I/O error, bad magic, an error text longer than kMaxErrorBytes).
std::string recv_response(int fd, ResponseHeader& header, std::string& remote_error);

// One CONTROL request/response on a fresh authenticated connection (the RDMA QP handshake).
// Throws TransferError naming the endpoint and the cause.
std::string control_call(const std::string& endpoint, const std::string& token,
                         const std::string& request, double timeout_s);

}  // namespace mooncake_vllm::net
