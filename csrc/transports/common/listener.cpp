#include "listener.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "auth.h"
#include "frames.h"
#include "mooncake_vllm/log.h"
#include "mooncake_vllm/types.h"
#include "threads.h"

namespace mooncake_vllm::net {

ListenerOptions listener_options(const EngineConfig& config) {
  ListenerOptions options;
  options.host = config.hostname;
  options.port = config.port;
  options.token = config.cluster_token;
  options.handshake_timeout_s = std::min(config.timeout_s, 10.0);
  options.io_timeout_s = config.timeout_s;
  options.idle_timeout_s = config.idle_timeout_s;
  options.max_connections = config.max_connections;
  options.max_connections_per_address = config.max_connections_per_address;
  return options;
}

Listener::Listener(ListenerOptions options) : options_(std::move(options)) {}

Listener::~Listener() { stop(); }

uint16_t Listener::start() {
  uint16_t bound = 0;
  listener_ = listen_on(options_.host, options_.port, &bound);
  acceptor_ = start_thread("the listener", [this] { accept_loop(); });
  return bound;
}

void Listener::stop() {
  if (stopping_.exchange(true)) return;
  listener_.shutdown_both();
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard lock(mu_);
    for (auto& conn : connections_) conn->sock->shutdown_both();
  }
  reap_finished(true);
}

uint64_t Listener::open_connections() const {
  std::lock_guard lock(mu_);
  return connections_.size();
}

void Listener::reap_finished(bool all) {
  std::list<std::unique_ptr<Connection>> done;
  {
    std::lock_guard lock(mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if (all || (*it)->finished.load()) {
        if (--per_address_[(*it)->address] <= 0) per_address_.erase((*it)->address);
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
// (address, "address:port") of a connected peer.
std::pair<std::string, std::string> peer_name(const sockaddr_storage& addr) {
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
  return {text, std::string(text) + ":" + std::to_string(port)};
}
}  // namespace

void Listener::accept_loop() {
  while (!stopping_.load()) {
    // Nothing that goes wrong with one connection may end the loop (or, escaping the thread,
    // the process): it is logged and the loop goes on.
    try {
      accept_one();
    } catch (const std::exception& e) {
      MV_LOG(kError, "listener on " << options_.host << ": " << e.what());
    } catch (...) {
      MV_LOG(kError, "listener on " << options_.host << ": unknown exception");
    }
  }
}

void Listener::accept_one() {
  pollfd pfd{listener_.fd(), POLLIN, 0};
  int ready = ::poll(&pfd, 1, 200);
  reap_finished(false);
  if (ready <= 0 || stopping_.load()) return;
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  Socket sock(::accept4(listener_.fd(), reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC));
  if (!sock.valid()) {
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      MV_LOG(kWarn, "listener: accept failed: " << std::strerror(errno));
      ::poll(nullptr, 0, 50);  // let connections close before trying again
    }
    return;
  }
  auto [address, peer] = peer_name(addr);
  std::lock_guard lock(mu_);
  if (stopping_.load()) return;
  auto open_here = per_address_.find(address);
  int from_address = open_here == per_address_.end() ? 0 : open_here->second;
  if (static_cast<int>(connections_.size()) >= options_.max_connections ||
      from_address >= options_.max_connections_per_address) {
    uint64_t refused = refused_.fetch_add(1) + 1;
    // A flood of refusals is logged once a second, not once per connection.
    auto now = std::chrono::steady_clock::now();
    if (now - last_refusal_log_ >= std::chrono::seconds(1)) {
      last_refusal_log_ = now;
      MV_LOG(kWarn, "refused connection from "
                        << peer << ": connection limit reached (" << connections_.size()
                        << " open, " << from_address << " from " << address
                        << "; max_connections " << options_.max_connections << ", per address "
                        << options_.max_connections_per_address << "; " << refused
                        << " refused so far)");
    }
    return;  // `sock` closes
  }
  tune_data_socket(sock.fd(), options_.io_timeout_s);
  auto conn = std::make_unique<Connection>();
  conn->sock = std::make_shared<Socket>(std::move(sock));
  conn->address = address;
  Connection* raw = conn.get();
  try {
    conn->thread = start_thread("a connection", [this, raw, peer = peer] { serve(raw, peer); });
  } catch (const TransferError& e) {
    refused_.fetch_add(1);
    MV_LOG(kWarn, "refused connection from " << peer << ": " << e.what());
    return;  // `conn` and its socket close
  }
  ++per_address_[address];
  connections_.push_back(std::move(conn));
}

void Listener::serve(Connection* conn, const std::string& peer) {
  int fd = conn->sock->fd();
  try {
    std::string refused = server_handshake(fd, options_.token, options_.handshake_timeout_s);
    if (!refused.empty()) {
      MV_LOG(kWarn, "refused connection from " << peer << ": " << refused);
    } else {
      // From here on a request that stops half-way fails after io_timeout_s; waiting for the
      // next request is bounded separately by idle_timeout_s (serve_one).
      set_recv_timeout(fd, options_.io_timeout_s);
      while (!stopping_.load() && serve_one(fd, peer)) {
      }
    }
  } catch (const std::exception& e) {
    MV_LOG(kWarn, "closing connection from " << peer << ": " << e.what());
  } catch (...) {
    MV_LOG(kError, "closing connection from " << peer << ": unknown exception");
  }
  conn->sock->shutdown_both();
  conn->finished.store(true);
}

bool Listener::serve_one(int fd, const std::string& peer) {
  if (!wait_readable(fd, options_.idle_timeout_s)) {
    MV_LOG(kInfo, "closing connection from " << peer << ": no request for "
                                             << options_.idle_timeout_s << " s");
    return false;
  }
  RequestHeader req{};
  std::string err = recv_bytes(fd, &req, sizeof(req));
  if (!err.empty()) {
    if (err != "peer closed the connection")
      MV_LOG(kWarn, "closing connection from " << peer << ": " << err);
    return false;
  }
  if (req.magic != kMagic) {
    MV_LOG(kWarn, "closing connection from " << peer << ": malformed request header");
    return false;
  }
  switch (static_cast<WireOp>(req.op)) {
    case WireOp::kControl:
      return serve_control(fd, req, peer);
    case WireOp::kWrite:
    case WireOp::kRead:
      if (!data_) {
        MV_LOG(kWarn, "closing connection from " << peer << ": "
                                                 << (static_cast<WireOp>(req.op) == WireOp::kWrite ? "WRITE" : "READ")
                                                 << " request, but this engine serves no data "
                                                    "requests over TCP (RDMA transport)");
        return false;
      }
      if (req.count > kMaxEntriesPerMessage) {
        MV_LOG(kWarn, "closing connection from " << peer << ": request of " << req.count
                                                 << " entries, limit " << kMaxEntriesPerMessage);
        return false;
      }
      return data_(fd, req, peer);
  }
  MV_LOG(kWarn, "closing connection from " << peer << ": unknown op " << int(req.op));
  return false;
}

bool Listener::serve_control(int fd, const RequestHeader& req, const std::string& peer) {
  // Refused before a byte of the payload is read: an engine without a control handler (TCP)
  // has nothing to say to a CONTROL request, and a payload over the limit is never allocated.
  if (!control_) {
    MV_LOG(kWarn, "closing connection from " << peer
                                             << ": CONTROL request, but this engine has no "
                                                "control handler (TCP transport)");
    return false;
  }
  if (req.count != 0 || req.total_bytes > kMaxControlBytes) {
    MV_LOG(kWarn, "closing connection from " << peer << ": CONTROL request of "
                                             << req.total_bytes << " bytes and " << req.count
                                             << " entries (limit " << kMaxControlBytes
                                             << " bytes, no entries)");
    return false;
  }
  std::string blob(req.total_bytes, '\0');
  if (!blob.empty()) {
    std::string err = recv_bytes(fd, blob.data(), blob.size());
    if (!err.empty()) {
      MV_LOG(kWarn, "closing connection from " << peer << ": CONTROL payload: " << err);
      return false;
    }
  }
  std::string reply, error;
  try {
    reply = control_(blob, peer.substr(0, peer.rfind(':')));  // peer is "host:port"
    if (reply.size() > kMaxControlBytes) throw TransferError("control reply too large");
  } catch (const std::exception& e) {
    error = e.what();
    MV_LOG(kWarn, "refused CONTROL request from " << peer << ": " << error);
  }
  std::vector<iovec> payload;
  if (error.empty() && !reply.empty()) payload.push_back({reply.data(), reply.size()});
  std::string err = send_response(fd, req.seq, error, payload);
  return err.empty();
}

}  // namespace mooncake_vllm::net
