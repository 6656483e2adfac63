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
};

std::unique_ptr<Verbs> make_fake_verbs(int nics);

FakeStats fake_stats();
void fake_reset_stats();
// The `after_wrs`-th WR executed from now on (0: the next one) fails with `status`.
void fake_inject_error(ibv_wc_status status, uint64_t after_wrs);
// The next WR posted, and every later one on the same QP, never completes (a peer that stopped
// answering) until the QP is moved to ERR, which flushes them.
void fake_inject_stall();

}  // namespace mooncake_vllm::rdma
