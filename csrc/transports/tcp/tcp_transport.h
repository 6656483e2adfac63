// TCP transport: a listener for peers' requests, and for each remote segment a few pipelined
// connections over which large batches are striped.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mooncake_vllm/transport.h"
#include "tcp_link.h"
#include "tcp_server.h"

namespace mooncake_vllm::tcp {

class TcpTransport : public Transport {
 public:
  TcpTransport(RegionRegistry& registry, const EngineConfig& config);
  ~TcpTransport() override;
  std::string name() const override { return "tcp"; }
  std::string start() override;
  void open_peer(const std::shared_ptr<const Peer>& peer) override;
  void submit(const std::shared_ptr<const Peer>& peer, const std::shared_ptr<Batch>& batch,
              std::vector<Request> requests) override;
  void stop() override;
  std::map<std::string, uint64_t> stats() const override;
  TcpServer& server() { return server_; }

 private:
  struct PeerLinks {
    std::vector<std::shared_ptr<Link>> links;
    std::atomic<uint32_t> next_lane{0};
  };
  RegionRegistry& registry_;
  EngineConfig config_;
  TcpServer server_;
  std::mutex mu_;
  std::map<uint64_t, std::shared_ptr<PeerLinks>> peers_;
  bool stopped_ = false;
  LinkCounters counters_;
};

// One request/response on a fresh authenticated connection (the RDMA QP handshake).
std::string control_call(const std::string& endpoint, const std::string& token,
                         const std::string& request, double timeout_s);

}  // namespace mooncake_vllm::tcp
