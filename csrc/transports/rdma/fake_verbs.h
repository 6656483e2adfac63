// FakeVerbs: a TEST DOUBLE of the verbs interface that simulates RDMA NICs in software, for
// testing the RDMA transport's logic on machines without RDMA hardware. All fake NICs of a
// process share one fabric: memory regions with lkey/rkey and access checks, RC queue pairs with
// the RESET->INIT->RTR->RTS state machine (required attribute masks enforced), send queues with a
// depth limit (slots are freed only when a later signalled completion is polled, like hardware),
// WR chains executed by memcpy, completion queues, and injected errors that move the QP to the
// error state and flush its remaining work requests. It cannot cross processes.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "verbs.h"

namespace mooncake_vllm::rdma {

struct FakeStats {
  uint64_t post_send_calls = 0;
  uint64_t wrs_posted = 0;
  uint64_t wrs_signaled = 0;
  uint64_t completions = 0;
  uint64_t error_completions = 0;
  uint64_t cq_overflows = 0;
  uint64_t send_queue_full = 0;  // post_send refused: more WRs outstanding than max_send_wr
  uint64_t max_outstanding = 0;  // deepest any send queue got
  std::map<std::string, uint64_t> bytes_by_device;
  std::map<std::string, uint64_t> wrs_by_device;
  std::vector<std::string> qp_transitions;  // "qpn:FROM->TO"
  std::vector<uint64_t> wr_lengths;         // every executed WR's length (slicing checks)
  uint64_t live_qps = 0;                    // created and not destroyed
  uint64_t max_cq_outstanding = 0;          // most WRs outstanding on all QPs of one CQ
  // Per QP (by number): port, sgid_index, hop_limit, path_mtu, rq_psn (RTR), sq_psn (RTS).
  std::map<uint32_t, std::map<std::string, uint64_t>> qp_attrs;
};

// How the fake NICs opened from now on look (each engine opens its NICs when it starts).
struct FakeConfig {
  int ports = 1;
  int active_port = 1;  // the other ports are DOWN
  ibv_mtu active_mtu = IBV_MTU_4096;
};
void fake_configure(const FakeConfig& config);

std::unique_ptr<Verbs> make_fake_verbs(int nics);

FakeStats fake_stats();
void fake_reset_stats();
// The `after_wrs`-th WR executed from now on (0: the next one) fails with `status`.
void fake_inject_error(ibv_wc_status status, uint64_t after_wrs);
// The next WR posted, and every later one on the same QP, never completes (a peer that stopped
// answering) until the QP is moved to ERR, which flushes them.
void fake_inject_stall();
// Stalled WRs execute and complete now (a peer that answers again).
void fake_release_stall();
// The next post_send of a chain longer than `posted` WRs takes only its first `posted` (they
// stay in the send queue, not yet executed, as on a busy NIC) and fails the rest with ENOMEM,
// *bad_wr pointing at the first WR not taken.
void fake_inject_partial_post(uint32_t posted);

}  // namespace mooncake_vllm::rdma
