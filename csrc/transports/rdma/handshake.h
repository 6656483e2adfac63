// The QP handshake's messages, carried as CONTROL requests over the TCP listener.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mooncake_vllm::rdma {

// A peer may ask for at most this many QPs (lanes) in one handshake: one per NIC pair; the
// responder creates QPs only for a request within the cap.
constexpr size_t kMaxQpsPerPeer = 16;

struct QpEndpoint {
  int lane = 0;
  int device = 0;  // request: the responder's device index to pair with; reply: unused
  uint32_t qpn = 0;
  ibv_gid gid{};
  uint32_t lid = 0;
  uint32_t psn = 0;  // the first PSN this QP sends with (random); the other end expects it
  int mtu = 0;       // this end's active MTU (enum ibv_mtu); the QP uses the smaller
};

struct HandshakeRequest {
  std::string requester;
  std::vector<QpEndpoint> qps;
};

std::string gid_to_hex(const ibv_gid& gid);
ibv_gid gid_from_hex(const std::string& hex);  // throws InvalidArgument

std::string encode_request(const HandshakeRequest& request);
// Throws TransferError on a malformed request, more than kMaxQpsPerPeer QPs, a lane number
// out of range or repeated.
HandshakeRequest decode_request(const std::string& blob);
std::string encode_reply(const std::vector<QpEndpoint>& qps);
std::vector<QpEndpoint> decode_reply(const std::string& blob);

}  // namespace mooncake_vllm::rdma
