#include "handshake.h"

#include <cstdio>
#include <sstream>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm::rdma {

namespace {
constexpr const char* kMagic = "MVRDMA1";
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
        << qp.lid << '\n';
  return out.str();
}

HandshakeRequest decode_request(const std::string& blob) {
  std::istringstream in(blob);
  std::string magic;
  HandshakeRequest request;
  if (!(in >> magic >> request.requester) || magic != kMagic)
    throw TransferError("malformed RDMA handshake request");
  QpEndpoint qp;
  std::string gid;
  while (in >> qp.lane >> qp.device >> qp.qpn >> gid >> qp.lid) {
    qp.gid = gid_from_hex(gid);
    request.qps.push_back(qp);
  }
  if (request.qps.empty()) throw TransferError("RDMA handshake request names no queue pair");
  return request;
}

std::string encode_reply(const std::vector<QpEndpoint>& qps) {
  std::ostringstream out;
  for (const auto& qp : qps)
    out << qp.lane << ' ' << qp.qpn << ' ' << gid_to_hex(qp.gid) << ' ' << qp.lid << '\n';
  return out.str();
}

std::vector<QpEndpoint> decode_reply(const std::string& blob) {
  std::istringstream in(blob);
  std::vector<QpEndpoint> qps;
  QpEndpoint qp;
  std::string gid;
  while (in >> qp.lane >> qp.qpn >> gid >> qp.lid) {
    qp.gid = gid_from_hex(gid);
    qps.push_back(qp);
  }
  return qps;
}

}  // namespace mooncake_vllm::rdma
