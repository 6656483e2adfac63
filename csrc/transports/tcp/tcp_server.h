// The listener: serves WRITE / READ / CONTROL requests from peers straight out of, and into,
// registered memory, after the cluster-token handshake.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "mooncake_vllm/region_registry.h"
#include "socket_io.h"

namespace mooncake_vllm::tcp {

// Answers a CONTROL request (RDMA QP handshake); throws TransferError to refuse it.
using ControlHandler = std::function<std::string(const std::string&)>;

class TcpServer {
 public:
  TcpServer(RegionRegistry& registry, std::string host, uint16_t port, std::string token,
            double handshake_timeout_s);
  ~TcpServer();
  // Binds and starts accepting; returns the bound port.
  uint16_t start();
  void set_control_handler(ControlHandler handler) { control_ = std::move(handler); }
  void stop();

 private:
  struct Connection {
    std::shared_ptr<Socket> sock;
    std::thread thread;
    std::atomic<bool> finished{false};
  };
  void accept_loop();
  void serve(Connection* conn, std::string peer);
  // Returns false when the connection must be closed.
  bool serve_one(int fd, const std::string& peer);
  void reap_finished(bool all);

  RegionRegistry& registry_;
  const std::string host_;
  const uint16_t port_;
  const std::string token_;
  const double handshake_timeout_s_;
  ControlHandler control_;
  Socket listener_;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::list<std::unique_ptr<Connection>> connections_;
};

}  // namespace mooncake_vllm::tcp
