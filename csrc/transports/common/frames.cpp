#include "frames.h"

#include <chrono>

#include "auth.h"
#include "mooncake_vllm/types.h"
#include "socket_io.h"

namespace mooncake_vllm::net {

std::string send_response(int fd, uint64_t seq, const std::string& error,
                          const std::vector<iovec>& payload) {
  ResponseHeader resp{};
  resp.magic = kMagic;
  resp.seq = seq;
  resp.status = error.empty() ? 0 : 1;
  std::string text = error.substr(0, kMaxErrorBytes);
  resp.error_len = static_cast<uint32_t>(text.size());
  std::vector<iovec> out;
  out.reserve(payload.size() + 2);
  out.push_back({&resp, sizeof(resp)});
  if (!text.empty()) out.push_back({text.data(), text.size()});
  if (resp.status == 0)
    for (const iovec& v : payload) {
      resp.payload_bytes += v.iov_len;
      out.push_back(v);
    }
  return send_all(fd, out.data(), out.size());
}

std::string recv_response(int fd, ResponseHeader& header, std::string& remote_error) {
  header = ResponseHeader{};
  remote_error.clear();
  std::string err = recv_bytes(fd, &header, sizeof(header));
  if (!err.empty()) return err;
  if (header.magic != kMagic) return "malformed response (bad magic)";
  if (header.error_len > kMaxErrorBytes)
    return "malformed response (error text of " + std::to_string(header.error_len) +
           " bytes, limit " + std::to_string(kMaxErrorBytes) + ")";
  if (header.status != 0 && header.payload_bytes != 0)
    return "malformed response (a refusal carrying a payload)";
  remote_error.assign(header.error_len, '\0');
  if (!remote_error.empty()) return recv_bytes(fd, remote_error.data(), remote_error.size());
  return {};
}

std::string control_call(const std::string& endpoint, const std::string& token,
                         const std::string& request, double timeout_s) {
  if (request.size() > kMaxControlBytes)
    throw TransferError("control request to " + endpoint + " is " +
                        std::to_string(request.size()) + " bytes, limit " +
                        std::to_string(kMaxControlBytes));
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeout_s));
  Socket sock = connect_to(endpoint, deadline, timeout_s);
  client_handshake(sock.fd(), endpoint, token, timeout_s);
  set_recv_timeout(sock.fd(), timeout_s);
  RequestHeader header{};
  header.magic = kMagic;
  header.op = static_cast<uint8_t>(WireOp::kControl);
  header.seq = 1;
  header.total_bytes = request.size();
  iovec iov[2] = {{&header, sizeof(header)}, {const_cast<char*>(request.data()), request.size()}};
  std::string err = send_all(sock.fd(), iov, 2);
  ResponseHeader resp{};
  std::string remote_error;
  if (err.empty()) err = recv_response(sock.fd(), resp, remote_error);
  if (err.empty() && resp.seq != header.seq) err = "response to another request";
  if (err.empty() && resp.payload_bytes > kMaxControlBytes)
    err = "control reply of " + std::to_string(resp.payload_bytes) + " bytes, limit " +
          std::to_string(kMaxControlBytes);
  std::string reply;
  if (err.empty()) {
    reply.assign(resp.payload_bytes, '\0');
    if (!reply.empty()) err = recv_bytes(sock.fd(), reply.data(), reply.size());
  }
  if (!err.empty()) throw TransferError("control request to " + endpoint + ": " + err);
  if (resp.status != 0)
    throw TransferError("peer " + endpoint + " refused control request: " + remote_error);
  return reply;
}

}  // namespace mooncake_vllm::net
