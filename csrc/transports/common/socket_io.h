// Blocking socket helpers: whole-buffer scatter/gather I/O, connect with a deadline.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace mooncake_vllm::net {

// Owns a socket file descriptor.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  Socket(Socket&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  Socket& operator=(Socket&& other) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket();
  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Wakes every thread blocked on this socket (they see EOF / EPIPE); the fd stays open.
  void shutdown_both();

 private:
  int fd_ = -1;
};

// "host:port" -> (host, port); throws InvalidArgument naming the bad endpoint.
std::pair<std::string, uint16_t> split_endpoint(const std::string& endpoint);

// Connects with a deadline. Throws TransferError("connect to <endpoint> failed: <cause>").
Socket connect_to(const std::string& endpoint, std::chrono::steady_clock::time_point deadline,
                  double dead_after_s);

// Listening socket bound to exactly `host` (not the wildcard address); port 0 picks one.
Socket listen_on(const std::string& host, uint16_t port, uint16_t* bound_port);

// Every data socket, client and server: no Nagle delay, and TCP keepalive plus
// TCP_USER_TIMEOUT so that a peer that vanished (partition, power loss: no FIN, no RST) is
// detected within about `dead_after_s` instead of holding the connection (and its thread)
// forever.
void tune_data_socket(int fd, double dead_after_s);
// Send and receive timeout of every blocking call on `fd`; 0 disables it.
void set_recv_timeout(int fd, double seconds);
// Waits until `fd` is readable (or hung up); false when `seconds` passed first.
bool wait_readable(int fd, double seconds);

// Both return an empty string on success, else the cause ("peer closed the connection",
// strerror text). They retry on partial transfers and EINTR. `iov` is modified.
std::string send_all(int fd, struct iovec* iov, size_t iovcnt);
std::string recv_all(int fd, struct iovec* iov, size_t iovcnt);
std::string send_bytes(int fd, const void* data, size_t len);
std::string recv_bytes(int fd, void* data, size_t len);
// Reads and throws away `len` bytes (payload of a refused WRITE).
std::string discard_bytes(int fd, uint64_t len);

}  // namespace mooncake_vllm::net
