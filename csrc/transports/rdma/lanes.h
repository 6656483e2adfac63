// The RDMA transport's queue pairs ("lanes"), the chains of work requests posted on them, a
// peer's connection state, and the QP life cycle: create (RESET -> INIT), connect (RTR, RTS
// towards one remote QP), ERR (flushes its work), destroy.
#pragma once

#include <infiniband/verbs.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device.h"
#include "handshake.h"
#include "mooncake_vllm/batch.h"
#include "mooncake_vllm/region_registry.h"
#include "mooncake_vllm/types.h"
#include "verbs.h"

namespace mooncake_vllm::rdma {

constexpr uint32_t kMaxSendWr = 256;  // send-queue depth per QP

struct PeerState;
struct Chain;

// One RC queue pair from a local NIC to a remote NIC, with its send-queue accounting.
struct Lane {
  Device* device = nullptr;
  int remote_device = 0;
  ibv_qp* qp = nullptr;
  uint32_t psn = 0;  // our first send PSN
  std::weak_ptr<PeerState> owner;  // the peer whose lanes these are (initiator side)
  std::mutex mu;
  std::condition_variable cv;
  uint32_t outstanding = 0;  // WRs posted whose chain has not completed
  uint32_t chains_in_flight = 0;
  // Chains of which only a prefix was posted (ibv_post_send stopped at bad_wr): those WRs still
  // name the chain and read its leased memory, so it lives until the QP is destroyed.
  std::vector<std::unique_ptr<Chain>> orphans;
};

// One posted chain of WRs; only its last WR is signalled. wr_id = address | 1 on the tail,
// address | 0 on the others (their completions appear only when they fail or are flushed).
struct Chain {
  std::shared_ptr<Batch> batch;
  std::shared_ptr<Lane> lane;
  uint32_t wrs = 0;
  LeaseSet leases;
  bool reported = false;
  void report(bool ok, const std::string& error) {
    if (reported) return;
    reported = true;
    batch->part_done(ok, error);
  }
};

struct PeerState {
  // Held while (re)connecting, network handshake included, so that concurrent batches to the
  // same peer connect once. Nothing else ever waits for it: `mu` guards the state itself and
  // is only held for short updates (the completion poller and abort hooks take it).
  std::mutex connect_mu;
  std::mutex mu;
  bool connected = false;
  uint64_t generation = 0;  // bumped when the peer needs new QPs
  bool opened = false;
  SegmentDescriptor desc;  // the version the lanes are for
  std::vector<std::shared_ptr<Lane>> lanes;
  std::atomic<uint32_t> next_lane{0};
};

// A QP in INIT on `dev`'s active port, with a random starting PSN. Throws TransferError.
std::shared_ptr<Lane> create_lane(Verbs& verbs, Device* dev, int remote_device);
// INIT -> RTR (towards `remote`, at the smaller of both MTUs) -> RTS. Throws TransferError.
void connect_lane(Verbs& verbs, Lane& lane, const QpEndpoint& remote);
// Moves the QP to ERR, which flushes every outstanding WR (each with its own completion).
void lane_to_error(Verbs& verbs, Lane& lane);
// Destroys the QP (the poller must not wait for any of its work any more) and frees what only
// its WRs referred to (orphaned chains), returning their completion budget to the device.
void destroy_lane(Verbs& verbs, Lane& lane);
// What the other end of the handshake needs to know of this lane.
QpEndpoint endpoint_of(const Lane& lane, int lane_index, int device);

}  // namespace mooncake_vllm::rdma
