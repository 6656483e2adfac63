// The seam between the engine core and the ways bytes move (TCP, RDMA).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mooncake_vllm/batch.h"
#include "mooncake_vllm/region_registry.h"
#include "mooncake_vllm/types.h"

namespace mooncake_vllm {

// A remote segment as a transport sees it. Immutable: re-opening a segment with a changed
// descriptor makes a new Peer with the same handle, so a batch keeps the version it started with.
struct Peer {
  uint64_t handle = 0;
  SegmentDescriptor desc;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual std::string name() const = 0;
  // Starts listening; returns the endpoint "host:port" actually bound.
  virtual std::string start() = 0;
  // Adds transport-specific parts (RDMA: devices, rkeys) to our descriptor.
  virtual void describe(SegmentDescriptor& desc) { (void)desc; }
  // Called for every registered region before it becomes visible (RDMA: register MRs).
  virtual void on_register(Region& region) { (void)region; }
  // Called after the region is gone and no lease is held any more (RDMA: deregister MRs).
  virtual void on_unregister(const Region& region) { (void)region; }
  // A new remote segment, or a new version of one (same handle).
  virtual void open_peer(const std::shared_ptr<const Peer>& peer) = 0;
  // Queues the requests and returns; every part later reports to `batch`.
  virtual void submit(const std::shared_ptr<const Peer>& peer, const std::shared_ptr<Batch>& batch,
                      std::vector<Request> requests) = 0;
  virtual void stop() = 0;
  // Counters for observability and tests (messages, system calls, connections, ...).
  virtual std::map<std::string, uint64_t> stats() const { return {}; }
};

}  // namespace mooncake_vllm
