// The transfer engine: registered memory, remote segments, batches, and one transport.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mooncake_vllm/batch.h"
#include "mooncake_vllm/region_registry.h"
#include "mooncake_vllm/transport.h"
#include "mooncake_vllm/types.h"

namespace mooncake_vllm {

class TransferEngine {
 public:
  explicit TransferEngine(EngineConfig config);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  const std::string& protocol() const { return protocol_; }
  // Why this protocol was chosen ("auto: no RDMA device, using tcp"); empty when asked for.
  const std::string& protocol_note() const { return protocol_note_; }
  const std::string& endpoint() const { return endpoint_; }

  // remote_read: peers may READ the region (by default they may only WRITE into it).
  void register_memory(uint64_t addr, uint64_t length, bool remote_read = false);
  void unregister_memory(uint64_t addr);
  SegmentDescriptor descriptor() const;
  uint64_t open_segment(const SegmentDescriptor& desc);
  uint64_t submit(uint64_t segment, OpCode op, const uint64_t* local, const uint64_t* remote,
                  const uint64_t* lengths, size_t count);
  BatchState status(uint64_t batch_id, std::string* error) const;
  // timeout_s < 0: until the batch's own deadline (plus a grace period for the watchdog).
  BatchState wait(uint64_t batch_id, double timeout_s, std::string* error) const;
  void release(uint64_t batch_id);
  size_t live_batches() const { return batches_.size(); }
  std::map<std::string, uint64_t> stats() const { return transport_->stats(); }
  void close();

 private:
  void check_open() const;
  EngineConfig config_;
  std::string protocol_;
  std::string protocol_note_;
  std::string endpoint_;
  RegionRegistry registry_;
  std::unique_ptr<Transport> transport_;
  // Declared after the transport so that it is destroyed first: its watchdog runs abort hooks
  // that call into the transport.
  BatchTable batches_;
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> handles_by_name_;
  std::map<uint64_t, std::shared_ptr<const Peer>> peers_;
  uint64_t next_peer_ = 1;
  std::atomic<bool> closed_{false};
};

// Transports compiled into this build, e.g. {"tcp", "rdma"}.
std::vector<std::string> compiled_transports();

}  // namespace mooncake_vllm
