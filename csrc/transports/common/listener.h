// The engine's listener, shared by both transports: accepts connections (bounded in total and
// per peer address), authenticates each one (auth.h), then serves its request frames on a
// thread of its own: CONTROL requests (the RDMA QP handshake) through the control handler, and
// WRITE/READ requests through the data handler (the TCP transport's). A frame for a handler
// the engine does not have closes the connection before any of its payload is read.
//
// Every failure on a connection (malformed frame, oversized length, I/O error, exception from
// a handler) is logged and closes that connection only; the listener keeps serving.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "mooncake_vllm/types.h"
#include "socket_io.h"
#include "wire.h"

namespace mooncake_vllm::net {

// Answers a CONTROL request; throws to refuse it (the error text goes back to the peer).
// Arguments: the request, and the host (address) it came from.
using ControlHandler = std::function<std::string(const std::string&, const std::string&)>;
// Serves one WRITE/READ request whose header has been read (and its op and entry count
// checked): reads the entries and payload, sends the response. Returns false (or throws) when
// the connection must be closed.
using DataHandler =
    std::function<bool(int fd, const RequestHeader& header, const std::string& peer)>;

struct ListenerOptions {
  std::string host;
  uint16_t port = 0;
  std::string token;
  double handshake_timeout_s = 10;
  double io_timeout_s = 30;     // a request (or response) that stops moving half-way
  double idle_timeout_s = 120;  // no request at all
  int max_connections = 256;
  int max_connections_per_address = 64;
};

// The engine's settings for its listener.
ListenerOptions listener_options(const EngineConfig& config);

class Listener {
 public:
  explicit Listener(ListenerOptions options);
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  // Set before start().
  void set_control_handler(ControlHandler handler) { control_ = std::move(handler); }
  void set_data_handler(DataHandler handler) { data_ = std::move(handler); }
  // Binds and starts accepting; returns the bound port.
  uint16_t start();
  void stop();
  uint64_t open_connections() const;
  uint64_t refused_connections() const { return refused_.load(); }

 private:
  struct Connection {
    std::shared_ptr<Socket> sock;
    std::string address;  // the peer's IP, for the per-address cap
    std::thread thread;
    std::atomic<bool> finished{false};
  };
  void accept_loop();
  void accept_one();
  void serve(Connection* conn, const std::string& peer);
  // Returns false when the connection must be closed.
  bool serve_one(int fd, const std::string& peer);
  bool serve_control(int fd, const RequestHeader& req, const std::string& peer);
  void reap_finished(bool all);

  const ListenerOptions options_;
  ControlHandler control_;
  DataHandler data_;
  Socket listener_;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> refused_{0};
  mutable std::mutex mu_;
  std::list<std::unique_ptr<Connection>> connections_;
  std::map<std::string, int> per_address_;
  std::chrono::steady_clock::time_point last_refusal_log_{};
};

}  // namespace mooncake_vllm::net
