#include "handshake.h"

#include <cstdio>
#include <sstream>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm::rdma {

namespace {
constexpr const char* kMagic = "MVRDMA2";
constexpr size_t kMaxRequesterChars = 256;

bool valid_mtu(int mtu) { return mtu >= IBV_MTU_256 && mtu <= IBV_MTU_4096; }
}

std::string gid_to_hex(const ibv_gid& gid) {
  char out[33];
  for (int i = 0; i < 16; ++i) std::snprintf(out + 2 * i, 3, "%02x", gid.raw[i]);
  return std::string(out, 32);
}

ibv_gid gid_from_hex(const std::string& hex) {
  if (hex.size() != 32) throw InvalidArgument("GID '" + hex + "' is not 32 hex digits");
  ibv_gid gid{};
  for (int i = 0; i < 16; ++i) {
    unsigned value = 0;
    if (std::sscanf(hex.c_str() + 2 * i, "%2x", &value) != 1)
      throw InvalidArgument("GID '" + hex + "' is not hexadecimal");
    gid.raw[i] = static_cast<uint8_t>(value);
  }
  return gid;
}

std::string encode_request(const HandshakeRequest& request) {
  std::ostringstream out;
  out << kMagic << ' ' << request.requester << '\n';
  for (const auto& qp : request.qps)
    out << qp.lane << ' ' << qp.device << ' ' << qp.qpn << ' ' << gid_to_hex(qp.gid) << ' '
        << qp.lid << ' ' << qp.psn << ' ' << qp.mtu << '\n';
  return out.str();
}

HandshakeRequest decode_request(const std::string& blob) {
  std::istringstream in(blob);
  std::string magic;
  HandshakeRequest request;
  if (!(in >> magic >> request.requester) || magic != kMagic ||
      request.requester.size() > kMaxRequesterChars)
    throw TransferError("malformed RDMA handshake request");
  QpEndpoint qp;
  std::string gid;
  std::vector<bool> seen(kMaxQpsPerPeer, false);
  while (in >> qp.lane >> qp.device >> qp.qpn >> gid >> qp.lid >> qp.psn >> qp.mtu) {
    if (request.qps.size() == kMaxQpsPerPeer)
      throw TransferError("RDMA handshake request asks for more than " +
                          std::to_string(kMaxQpsPerPeer) + " queue pairs");
    if (qp.lane < 0 || qp.lane >= static_cast<int>(kMaxQpsPerPeer) || seen[qp.lane])
      throw TransferError("RDMA handshake request has a bad or repeated lane number");
    if (!valid_mtu(qp.mtu)) throw TransferError("RDMA handshake request has a bad MTU");
    seen[qp.lane] = true;
    qp.gid = gid_from_hex(gid);
    qp.psn &= 0xffffff;
    request.qps.push_back(qp);
  }
  if (request.qps.empty()) throw TransferError("RDMA handshake request names no queue pair");
  return request;
}

std::string encode_reply(const std::vector<QpEndpoint>& qps) {
  std::ostringstream out;
  for (const auto& qp : qps)
    out << qp.lane << ' ' << qp.qpn << ' ' << gid_to_hex(qp.gid) << ' ' << qp.lid << ' ' << qp.psn
        << ' ' << qp.mtu << '\n';
  return out.str();
}

std::vector<QpEndpoint> decode_reply(const std::string& blob) {
  std::istringstream in(blob);
  std::vector<QpEndpoint> qps;
  QpEndpoint qp;
  std::string gid;
  while (in >> qp.lane >> qp.qpn >> gid >> qp.lid >> qp.psn >> qp.mtu) {
    if (qps.size() == kMaxQpsPerPeer || !valid_mtu(qp.mtu))
      throw TransferError("malformed RDMA handshake reply");
    qp.gid = gid_from_hex(gid);
    qp.psn &= 0xffffff;
    qps.push_back(qp);
  }
  return qps;
}

}  // namespace mooncake_vllm::rdma
