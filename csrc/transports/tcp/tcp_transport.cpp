#include "tcp_transport.h"

#include "data_service.h"
#include "mooncake_vllm/request_planner.h"

namespace mooncake_vllm::tcp {

namespace {
// A batch smaller than this goes over one connection as one message: splitting it would cost
// more in per-message work than the parallel streams gain.
constexpr uint64_t kMinStripeBytes = 512 * 1024;
// Large parts keep the per-message overhead negligible while leaving every connection
// several parts of a 64 MiB transfer to pipeline.
constexpr uint64_t kMaxPartBytes = 16ull << 20;
constexpr size_t kMaxPartRequests = 4096;
}  // namespace

TcpTransport::TcpTransport(RegionRegistry& registry, const EngineConfig& config)
    : registry_(registry),
      config_(config),
      server_(net::listener_options(config)) {
  server_.set_data_handler([this](int fd, const net::RequestHeader& req, const std::string& peer) {
    return serve_data_request(registry_, fd, req, peer);
  });
}

TcpTransport::~TcpTransport() { stop(); }

std::string TcpTransport::start() {
  uint16_t port = server_.start();
  std::string host = config_.hostname;
  if (host.find(':') != std::string::npos) host = "[" + host + "]";
  return host + ":" + std::to_string(port);
}

std::shared_ptr<TcpTransport::PeerLinks> TcpTransport::make_links(const std::string& endpoint) {
  auto entry = std::make_shared<PeerLinks>();
  int count = std::max(1, config_.connections_per_peer);
  for (int i = 0; i < count; ++i) {
    auto link = std::make_shared<Link>(
        registry_,
        LinkSettings{endpoint, config_.cluster_token, config_.timeout_s,
                     config_.idle_timeout_s / 2},
        i, counters_);
    link->start();  // on failure the links made so far stop as `entry` goes
    entry->links.push_back(std::move(link));
  }
  return entry;
}

void TcpTransport::take_idle_peers(std::vector<std::shared_ptr<PeerLinks>>& evicted) {
  auto now = Clock::now();
  if (now - last_idle_scan_ < std::chrono::seconds(1)) return;
  last_idle_scan_ = now;
  auto quiet = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(config_.idle_timeout_s));
  for (auto it = peers_.begin(); it != peers_.end();) {
    bool idle = true;
    for (auto& link : it->second->links) idle = idle && link->idle_for(quiet);
    if (idle) {
      evicted.push_back(std::move(it->second));
      it = peers_.erase(it);
    } else {
      ++it;
    }
  }
  evicted_peers_.fetch_add(evicted.size());
}

void TcpTransport::open_peer(const std::shared_ptr<const Peer>& peer) {
  std::vector<std::shared_ptr<PeerLinks>> evicted;
  {
    std::lock_guard lock(mu_);
    if (stopped_) throw TransferError("engine closed");
    take_idle_peers(evicted);
    auto found = peers_.find(peer->handle);
    if (found != peers_.end()) {
      for (auto& link : found->second->links) link->set_endpoint(peer->desc.endpoint);
    } else {
      peers_[peer->handle] = make_links(peer->desc.endpoint);
    }
  }
  for (auto& entry : evicted)
    for (auto& link : entry->links) link->stop();
}

void TcpTransport::submit(const std::shared_ptr<const Peer>& peer, const std::shared_ptr<Batch>& batch,
                          std::vector<Request> requests) {
  std::vector<std::shared_ptr<PeerLinks>> evicted;
  {
    // Queued under mu_, so that eviction (which takes links out under mu_ only when nothing
    // is queued on them) never stops a link this batch is being queued on.
    std::lock_guard lock(mu_);
    if (stopped_) throw TransferError("engine closed");
    take_idle_peers(evicted);
    auto& links = peers_[peer->handle];
    if (!links) {
      try {
        links = make_links(peer->desc.endpoint);
      } catch (...) {
        peers_.erase(peer->handle);
        throw;
      }
    }
    auto merged = coalesce_adjacent(requests);
    int lanes = static_cast<int>(links->links.size());
    uint32_t first = links->next_lane.fetch_add(1);
    auto parts = plan_parts(merged, lanes, static_cast<int>(first % lanes),
                            PlanLimits{kMinStripeBytes, kMaxPartBytes, kMaxPartRequests});
    batch->set_parts(static_cast<int>(parts.size()));
    std::vector<bool> used(lanes, false);
    for (auto& part : parts) {
      auto msg = std::make_shared<Message>();
      msg->op = batch->op();
      msg->requests = std::move(part.requests);
      msg->bytes = part.bytes;
      msg->batch = batch;
      if (!used[part.lane]) {
        used[part.lane] = true;
        std::weak_ptr<Link> weak = links->links[part.lane];
        batch->add_abort_hook([weak] {
          if (auto link = weak.lock()) link->abort("batch deadline passed");
        });
      }
      links->links[part.lane]->enqueue(std::move(msg));
    }
  }
  for (auto& entry : evicted)
    for (auto& link : entry->links) link->stop();
}

void TcpTransport::stop() {
  std::map<uint64_t, std::shared_ptr<PeerLinks>> peers;
  {
    std::lock_guard lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    peers.swap(peers_);
  }
  for (auto& [handle, entry] : peers)
    for (auto& link : entry->links) link->stop();
  server_.stop();
}

std::map<std::string, uint64_t> TcpTransport::stats() const {
  uint64_t peers_with_links;
  {
    std::lock_guard lock(mu_);
    peers_with_links = peers_.size();
  }
  return {{"messages_sent", counters_.messages_sent.load()},
          {"send_calls", counters_.send_calls.load()},
          {"bytes_sent", counters_.bytes_sent.load()},
          {"connects", counters_.connects.load()},
          {"server_connections", server_.open_connections()},
          {"peers_with_links", peers_with_links},
          {"evicted_peers", evicted_peers_.load()},
          {"server_refused_connections", server_.refused_connections()}};
}

}  // namespace mooncake_vllm::tcp
