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
#include "transports/common/listener.h"

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

 private:
  struct PeerLinks {
    std::vector<std::shared_ptr<Link>> links;
    std::atomic<uint32_t> next_lane{0};
  };
  // All links started, or none (throws TransferError).
  std::shared_ptr<PeerLinks> make_links(const std::string& endpoint);
  // Takes the links of peers idle for idle_timeout_s (no connection, nothing queued) out of
  // peers_, at most once a second, into `evicted`; the caller stops them without mu_ held.
  // A later batch to such a peer makes new links.
  void take_idle_peers(std::vector<std::shared_ptr<PeerLinks>>& evicted);
  RegionRegistry& registry_;
  EngineConfig config_;
  net::Listener server_;
  mutable std::mutex mu_;
  std::map<uint64_t, std::shared_ptr<PeerLinks>> peers_;
  bool stopped_ = false;
  Clock::time_point last_idle_scan_ = Clock::now();
  LinkCounters counters_;
  std::atomic<uint64_t> evicted_peers_{0};
};

}  // namespace mooncake_vllm::tcp
