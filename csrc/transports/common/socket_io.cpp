#include "socket_io.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <climits>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm::net {

Socket& Socket::operator=(Socket&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

Socket::~Socket() {
  if (fd_ >= 0) ::close(fd_);
}

void Socket::shutdown_both() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

std::pair<std::string, uint16_t> split_endpoint(const std::string& endpoint) {
  auto colon = endpoint.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size())
    throw InvalidArgument("endpoint '" + endpoint + "' is not host:port");
  std::string host = endpoint.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  long port = std::strtol(endpoint.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port <= 0 || port > 65535)
    throw InvalidArgument("endpoint '" + endpoint + "' has no valid port");
  return {host, static_cast<uint16_t>(port)};
}

namespace {

struct AddrInfo {
  addrinfo* list = nullptr;
  ~AddrInfo() {
    if (list) freeaddrinfo(list);
  }
};

void resolve(const std::string& host, uint16_t port, bool passive, AddrInfo& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  std::string service = std::to_string(port);
  int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &out.list);
  if (rc != 0)
    throw TransferError("cannot resolve host '" + host + "': " + gai_strerror(rc));
}

}  // namespace

Socket connect_to(const std::string& endpoint, std::chrono::steady_clock::time_point deadline,
                  double dead_after_s) {
  auto [host, port] = split_endpoint(endpoint);
  AddrInfo info;
  resolve(host, port, false, info);
  std::string last_error = "no address";
  for (addrinfo* ai = info.list; ai; ai = ai->ai_next) {
    Socket sock(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!sock.valid()) {
      last_error = std::strerror(errno);
      continue;
    }
    int flags = fcntl(sock.fd(), F_GETFL);
    fcntl(sock.fd(), F_SETFL, flags | O_NONBLOCK);
    int rc = ::connect(sock.fd(), ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno != EINPROGRESS) {
      last_error = std::strerror(errno);
      continue;
    }
    if (rc != 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      deadline - std::chrono::steady_clock::now())
                      .count();
      pollfd pfd{sock.fd(), POLLOUT, 0};
      int ready = left > 0 ? ::poll(&pfd, 1, static_cast<int>(left)) : 0;
      if (ready <= 0) {
        last_error = ready == 0 ? "timed out" : std::strerror(errno);
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(sock.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last_error = std::strerror(err);
        continue;
      }
    }
    fcntl(sock.fd(), F_SETFL, flags & ~O_NONBLOCK);
    tune_data_socket(sock.fd(), dead_after_s);
    return sock;
  }
  throw TransferError("connect to " + endpoint + " failed: " + last_error);
}

Socket listen_on(const std::string& host, uint16_t port, uint16_t* bound_port) {
  AddrInfo info;
  resolve(host, port, true, info);
  std::string last_error = "no address";
  for (addrinfo* ai = info.list; ai; ai = ai->ai_next) {
    Socket sock(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!sock.valid()) continue;
    int one = 1;
    setsockopt(sock.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(sock.fd(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(sock.fd(), 128) != 0) {
      last_error = std::strerror(errno);
      continue;
    }
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    getsockname(sock.fd(), reinterpret_cast<sockaddr*>(&addr), &len);
    *bound_port = ntohs(addr.ss_family == AF_INET6
                            ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                            : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
    return sock;
  }
  throw TransferError("cannot listen on " + host + ":" + std::to_string(port) + ": " + last_error);
}

void tune_data_socket(int fd, double dead_after_s) {
  int one = 1;
  // Responses and small batches must not wait for Nagle; big sends are single writev calls.
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // An idle connection probes after half the budget, then every sixth of it; unacknowledged
  // data (or probes) for the whole budget closes the connection with ETIMEDOUT.
  int budget = std::max(2, static_cast<int>(dead_after_s));
  int idle = std::max(1, budget / 2), interval = std::max(1, budget / 6), count = 3;
  unsigned int user_timeout_ms = static_cast<unsigned int>(budget) * 1000u;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
}

bool wait_readable(int fd, double seconds) {
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(seconds));
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) return false;
    pollfd pfd{fd, POLLIN | POLLRDHUP, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(left, 1 << 30)));
    if (ready > 0) return true;
    if (ready < 0 && errno != EINTR) return true;  // let the read report the error
  }
}

void set_recv_timeout(int fd, double seconds) {
  timeval tv{};
  if (seconds > 0) {
    tv.tv_sec = static_cast<time_t>(seconds);
    tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
    if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1000;
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

namespace {

// Advances (iov, iovcnt) past `done` bytes.
void advance(struct iovec*& iov, size_t& iovcnt, size_t done) {
  while (iovcnt > 0 && done >= iov->iov_len) {
    done -= iov->iov_len;
    ++iov;
    --iovcnt;
  }
  if (iovcnt > 0 && done > 0) {
    iov->iov_base = static_cast<char*>(iov->iov_base) + done;
    iov->iov_len -= done;
  }
}

std::string errno_text(const char* what) {
  if (errno == EAGAIN || errno == EWOULDBLOCK) return std::string(what) + " timed out";
  return std::string(what) + " failed: " + std::strerror(errno);
}

}  // namespace

std::string send_all(int fd, struct iovec* iov, size_t iovcnt) {
  advance(iov, iovcnt, 0);
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(iovcnt, IOV_MAX);
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_text("send");
    }
    advance(iov, iovcnt, static_cast<size_t>(n));
  }
  return {};
}

std::string recv_all(int fd, struct iovec* iov, size_t iovcnt) {
  // Skip leading empty iovecs so that a zero-byte read is not mistaken for EOF.
  advance(iov, iovcnt, 0);
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(iovcnt, IOV_MAX);
    ssize_t n = ::recvmsg(fd, &msg, MSG_WAITALL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_text("recv");
    }
    if (n == 0) return "peer closed the connection";
    advance(iov, iovcnt, static_cast<size_t>(n));
  }
  return {};
}

std::string send_bytes(int fd, const void* data, size_t len) {
  iovec iov{const_cast<void*>(data), len};
  return send_all(fd, &iov, 1);
}

std::string recv_bytes(int fd, void* data, size_t len) {
  iovec iov{data, len};
  return recv_all(fd, &iov, 1);
}

std::string discard_bytes(int fd, uint64_t len) {
  static thread_local std::vector<char> sink(1 << 16);
  while (len > 0) {
    size_t chunk = std::min<uint64_t>(len, sink.size());
    std::string err = recv_bytes(fd, sink.data(), chunk);
    if (!err.empty()) return err;
    len -= chunk;
  }
  return {};
}

}  // namespace mooncake_vllm::net
