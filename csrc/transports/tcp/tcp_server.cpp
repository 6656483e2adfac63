#include "tcp_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <vector>

#include "auth.h"
#include "mooncake_vllm/log.h"
#include "mooncake_vllm/types.h"
#include "wire.h"

namespace mooncake_vllm::tcp {

TcpServer::TcpServer(RegionRegistry& registry, std::string host, uint16_t port, std::string token,
                     double handshake_timeout_s)
    : registry_(registry),
      host_(std::move(host)),
      port_(port),
      token_(std::move(token)),
      handshake_timeout_s_(handshake_timeout_s) {}

TcpServer::~TcpServer() { stop(); }

uint16_t TcpServer::start() {
  uint16_t bound = 0;
  listener_ = listen_on(host_, port_, &bound);
  acceptor_ = std::thread([this] { accept_loop(); });
  return bound;
}

void TcpServer::stop() {
  if (stopping_.exchange(true)) return;
  listener_.shutdown_both();
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard lock(mu_);
    for (auto& conn : connections_) conn->sock->shutdown_both();
  }
  reap_finished(true);
}

void TcpServer::reap_finished(bool all) {
  std::list<std::unique_ptr<Connection>> done;
  {
    std::lock_guard lock(mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (all || (*it)->finished.load()) {
        done.push_back(std::move(*it));
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& conn : done) conn->thread.join();
}

namespace {
std::string peer_name(const sockaddr_storage& addr) {
  char text[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (addr.ss_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
    port = ntohs(in->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
    port = ntohs(in6->sin6_port);
  }
  return std::string(text) + ":" + std::to_string(port);
}
}  // namespace

void TcpServer::accept_loop() {
  while (!stopping_.load()) {
    pollfd pfd{listener_.fd(), POLLIN, 0};
    int ready = ::poll(&pfd, 1, 200);
    reap_finished(false);
    if (ready <= 0 || stopping_.load()) continue;
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    int fd = ::accept4(listener_.fd(), reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC);
    if (fd < 0) continue;
    tune_data_socket(fd);
    auto conn = std::make_unique<Connection>();
    conn->sock = std::make_shared<Socket>(fd);
    Connection* raw = conn.get();
    std::string peer = peer_name(addr);
    std::lock_guard lock(mu_);
    if (stopping_.load()) break;  // conn's socket closes as it goes out of scope
    conn->thread = std::thread([this, raw, peer] { serve(raw, peer); });
    connections_.push_back(std::move(conn));
  }
}

void TcpServer::serve(Connection* conn, std::string peer) {
  int fd = conn->sock->fd();
  std::string refused = server_handshake(fd, token_, handshake_timeout_s_);
  if (!refused.empty()) {
    MV_LOG(kWarn, "refused connection from " << peer << ": " << refused);
  } else {
    while (!stopping_.load() && serve_one(fd, peer)) {
    }
  }
  conn->sock->shutdown_both();
  conn->finished.store(true);
}

bool TcpServer::serve_one(int fd, const std::string& peer) {
  RequestHeader req{};
  std::string err = recv_bytes(fd, &req, sizeof(req));
  if (!err.empty()) {
    if (err != "peer closed the connection") MV_LOG(kDebug, "connection from " << peer << ": " << err);
    return false;
  }
  if (req.magic != kMagic || req.count > kMaxEntriesPerMessage) {
    MV_LOG(kWarn, "closing connection from " << peer << ": malformed request header");
    return false;
  }
  std::vector<Entry> entries(req.count);
  if (req.count > 0) {
    err = recv_bytes(fd, entries.data(), entries.size() * sizeof(Entry));
    if (!err.empty()) return false;
  }
  ResponseHeader resp{};
  resp.magic = kMagic;
  resp.seq = req.seq;
  std::string error_text;
  std::string control_reply;
  std::vector<iovec> payload;
  LeaseSet leases;

  auto op = static_cast<WireOp>(req.op);
  if (op == WireOp::kControl) {
    std::string blob(req.total_bytes, '\0');
    if (!blob.empty() && !recv_bytes(fd, blob.data(), blob.size()).empty()) return false;
    try {
      if (!control_) throw TransferError("this engine has no control handler (not RDMA)");
      control_reply = control_(blob);
    } catch (const std::exception& e) {
      error_text = e.what();
    }
    if (error_text.empty()) payload.push_back({control_reply.data(), control_reply.size()});
  } else if (op == WireOp::kWrite || op == WireOp::kRead) {
    uint64_t sum = 0;
    for (const Entry& e : entries) sum += e.length;
    if (sum != req.total_bytes) {
      MV_LOG(kWarn, "closing connection from " << peer << ": payload size mismatch");
      return false;
    }
    std::vector<uint64_t> addrs(entries.size()), lens(entries.size());
    for (size_t i = 0; i < entries.size(); ++i) {
      addrs[i] = entries[i].remote;
      lens[i] = entries[i].length;
    }
    // Bounds check of every entry before a single byte is written or read.
    error_text = registry_.acquire_all(addrs.data(), lens.data(), addrs.size(), leases, "remote");
    if (error_text.empty()) {
      payload.reserve(entries.size());
      for (const Entry& e : entries)
        if (e.length) payload.push_back({reinterpret_cast<void*>(e.remote), e.length});
    } else {
      MV_LOG(kWarn, "refused " << (op == WireOp::kWrite ? "WRITE" : "READ") << " from " << peer
                               << ": " << error_text);
    }
    if (op == WireOp::kWrite) {
      // The payload lands directly in the destination; a refused one is drained unread.
      err = error_text.empty() ? recv_all(fd, payload.data(), payload.size())
                               : discard_bytes(fd, req.total_bytes);
      leases.clear();
      payload.clear();
      if (!err.empty()) return false;
    }
  } else {
    MV_LOG(kWarn, "closing connection from " << peer << ": unknown op " << int(req.op));
    return false;
  }

  resp.status = error_text.empty() ? 0 : 1;
  resp.error_len = static_cast<uint32_t>(error_text.size());
  for (const iovec& v : payload) resp.payload_bytes += v.iov_len;
  std::vector<iovec> out;
  out.reserve(payload.size() + 2);
  out.push_back({&resp, sizeof(resp)});
  if (!error_text.empty()) out.push_back({error_text.data(), error_text.size()});
  out.insert(out.end(), payload.begin(), payload.end());
  err = send_all(fd, out.data(), out.size());
  return err.empty();
}

}  // namespace mooncake_vllm::tcp
