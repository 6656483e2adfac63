#include "mooncake_vllm/engine.h"

#include <algorithm>

#include "mooncake_vllm/log.h"
#include "transports/common/socket_io.h"
#include "transports/tcp/tcp_transport.h"
#ifdef MV_WITH_RDMA
#include "transports/rdma/rdma_transport.h"
#endif

namespace mooncake_vllm {

const char* op_name(OpCode op) { return op == OpCode::kWrite ? "WRITE" : "READ"; }

std::vector<std::string> compiled_transports() {
#ifdef MV_WITH_RDMA
  return {"tcp", "rdma"};
#else
  return {"tcp"};
#endif
}

namespace {

std::unique_ptr<Transport> make_transport(const EngineConfig& config, RegionRegistry& registry,
                                          std::string* protocol, std::string* note) {
  const std::string& wanted = config.protocol;
  if (wanted != "tcp" && wanted != "rdma" && wanted != "auto")
    throw InvalidArgument("protocol must be 'tcp', 'rdma' or 'auto', not '" + wanted + "'");
  if (wanted == "tcp") {
    *protocol = "tcp";
    return std::make_unique<tcp::TcpTransport>(registry, config);
  }
#ifdef MV_WITH_RDMA
  std::string why_not;
  if (rdma::rdma_usable(config, &why_not)) {
    *protocol = "rdma";
    if (wanted == "auto") *note = "protocol=auto: RDMA device found, using rdma";
    return rdma::make_rdma_transport(registry, config);
  }
#else
  std::string why_not = "the RDMA transport is not compiled into this build (no libibverbs)";
#endif
  if (wanted == "rdma") throw TransferError("protocol='rdma' requested but " + why_not);
  *protocol = "tcp";
  *note = "protocol=auto: " + why_not + "; using tcp";
  return std::make_unique<tcp::TcpTransport>(registry, config);
}

}  // namespace

TransferEngine::TransferEngine(EngineConfig config) : config_(std::move(config)) {
  if (config_.timeout_s <= 0) throw InvalidArgument("timeout_s must be > 0");
  if (config_.connections_per_peer < 1) throw InvalidArgument("connections_per_peer must be >= 1");
  if (config_.max_connections < 1 || config_.max_connections_per_address < 1)
    throw InvalidArgument("max_connections and max_connections_per_address must be >= 1");
  if (config_.idle_timeout_s <= 0) throw InvalidArgument("idle_timeout_s must be > 0");
  transport_ = make_transport(config_, registry_, &protocol_, &protocol_note_);
  if (!protocol_note_.empty()) MV_LOG(kInfo, protocol_note_);
  endpoint_ = transport_->start();
  if (config_.cluster_token.empty() && config_.hostname != "127.0.0.1" &&
      config_.hostname != "localhost" && config_.hostname != "::1")
    MV_LOG(kWarn, "no cluster_token: anyone who reaches " << endpoint_
                                                          << " can write into registered memory "
                                                             "(and read regions registered with "
                                                             "remote_read)");
}

TransferEngine::~TransferEngine() { close(); }

void TransferEngine::close() {
  if (closed_.exchange(true)) return;
  transport_->stop();
}

void TransferEngine::check_open() const {
  if (closed_.load()) throw TransferError("engine is closed");
}

void TransferEngine::register_memory(uint64_t addr, uint64_t length, bool remote_read) {
  check_open();
  auto region = std::make_shared<Region>();
  region->addr = addr;
  region->length = length;
  region->remote_read = remote_read;
  if (length == 0) throw InvalidArgument("register: length must be > 0");
  transport_->on_register(*region);
  try {
    registry_.add(region);
  } catch (...) {
    transport_->on_unregister(*region);
    throw;
  }
}

void TransferEngine::unregister_memory(uint64_t addr) {
  check_open();
  auto region = registry_.remove(addr, config_.timeout_s);
  if (!region) throw InvalidArgument("unregister: no region registered at " + hex_addr(addr));
  transport_->on_unregister(*region);
}

SegmentDescriptor TransferEngine::descriptor() const {
  SegmentDescriptor desc;
  desc.name = endpoint_;
  desc.protocol = protocol_;
  desc.endpoint = endpoint_;
  for (const auto& region : registry_.snapshot()) {
    desc.regions.emplace_back(region->addr, region->length);
    desc.rkeys.push_back(region->rkeys);
  }
  transport_->describe(desc);
  return desc;
}

uint64_t TransferEngine::open_segment(const SegmentDescriptor& desc) {
  check_open();
  if (desc.name.empty()) throw InvalidArgument("segment descriptor has an empty 'name'");
  if (desc.endpoint.empty()) throw InvalidArgument("segment descriptor has an empty 'endpoint'");
  net::split_endpoint(desc.endpoint);  // throws InvalidArgument naming a malformed endpoint
  if (desc.protocol != protocol_)
    throw InvalidArgument("segment '" + desc.name + "' speaks '" + desc.protocol +
                          "' but this engine uses '" + protocol_ + "'");
  auto peer = std::make_shared<Peer>();
  peer->desc = desc;
  {
    std::lock_guard lock(mu_);
    auto [slot, added] = handles_by_name_.emplace(desc.name, 0);
    if (added) slot->second = next_peer_++;
    peer->handle = slot->second;
  }
  transport_->open_peer(peer);
  std::lock_guard lock(mu_);
  peers_[peer->handle] = peer;
  return peer->handle;
}

namespace {
bool inside_descriptor(const SegmentDescriptor& desc, uint64_t addr, uint64_t len) {
  for (const auto& [start, length] : desc.regions)
    if (addr >= start && len <= length && addr - start <= length - len) return true;
  return false;
}
}  // namespace

uint64_t TransferEngine::submit(uint64_t segment, OpCode op, const uint64_t* local,
                                const uint64_t* remote, const uint64_t* lengths, size_t count) {
  check_open();
  std::shared_ptr<const Peer> peer;
  {
    std::lock_guard lock(mu_);
    auto it = peers_.find(segment);
    if (it == peers_.end())
      throw InvalidArgument("unknown segment handle " + std::to_string(segment));
    peer = it->second;
  }
  std::vector<Request> requests;
  requests.reserve(count);
  LeaseSet local_check;
  for (size_t i = 0; i < count; ++i) {
    if (lengths[i] == 0) continue;
    if (!local_check.holds(local[i], lengths[i])) {
      Lease lease = registry_.acquire(local[i], lengths[i]);
      if (!lease)
        throw InvalidArgument("request " + std::to_string(i) + ": local range " +
                              hex_addr(local[i]) + "+" + std::to_string(lengths[i]) +
                              " is not inside a registered region");
      local_check.add(std::move(lease));
    }
    if (!inside_descriptor(peer->desc, remote[i], lengths[i]))
      throw InvalidArgument("request " + std::to_string(i) + ": remote range " +
                            hex_addr(remote[i]) + "+" + std::to_string(lengths[i]) +
                            " is outside the regions of segment '" + peer->desc.name + "'");
    requests.push_back({local[i], remote[i], lengths[i]});
  }
  local_check.clear();
  auto batch = batches_.create(op, config_.timeout_s, peer->desc.name);
  try {
    transport_->submit(peer, batch, std::move(requests));
  } catch (...) {
    batches_.release(batch->id());
    throw;
  }
  return batch->id();
}

BatchState TransferEngine::status(uint64_t batch_id, std::string* error) const {
  return batches_.find(batch_id)->state(error);
}

BatchState TransferEngine::wait(uint64_t batch_id, double timeout_s, std::string* error) const {
  auto batch = batches_.find(batch_id);
  Clock::time_point until =
      timeout_s < 0 ? batch->deadline() + std::chrono::seconds(1)
                    : Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(timeout_s));
  return batch->wait_until(until, error);
}

void TransferEngine::release(uint64_t batch_id) { batches_.release(batch_id); }

}  // namespace mooncake_vllm
