// The QP handshake's messages, carried as CONTROL requests over the TCP listener.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mooncake_vllm::rdma {

struct QpEndpoint {
  int lane = 0;
  int device = 0;  // request: the responder's device index to pair with; reply: unused
  uint32_t qpn = 0;
  ibv_gid gid{};
  uint32_t lid = 0;
};

struct HandshakeRequest {
  std::string requester;
  std::vector<QpEndpoint> qps;
};

std::string gid_to_hex(const ibv_gid& gid);
ibv_gid gid_from_hex(const std::string& hex);  // throws InvalidArgument

std::string encode_request(const HandshakeRequest& request);
HandshakeRequest decode_request(const std::string& blob);  // throws TransferError
std::string encode_reply(const std::vector<QpEndpoint>& qps);
std::vector<QpEndpoint> decode_reply(const std::string& blob);

}  // namespace mooncake_vllm::rdma
