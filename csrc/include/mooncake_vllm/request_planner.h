// Turning a batch of requests into transport-sized parts: merge neighbours, cut big blocks,
// spread the bytes over several lanes (connections or NICs).
#pragma once

#include <cstdint>
#include <vector>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm {

// Merges requests whose local and remote ranges both continue the previous one (the connector's
// contiguous block runs arrive as one request each way, but a layer can also arrive split).
std::vector<Request> coalesce_adjacent(const std::vector<Request>& requests);

struct PlanLimits {
  uint64_t min_part_bytes;     // below this a batch is not split across lanes
  uint64_t max_part_bytes;     // no part carries more
  size_t max_part_requests;    // no part carries more entries (iovec limits)
};

struct Part {
  int lane;
  std::vector<Request> requests;
  uint64_t bytes = 0;
};

// Splits `requests` (already coalesced) into parts of balanced size, assigned round-robin to
// `lanes` lanes starting at `first_lane`; big requests are cut so that every lane gets work.
std::vector<Part> plan_parts(const std::vector<Request>& requests, int lanes, int first_lane,
                             const PlanLimits& limits);

}  // namespace mooncake_vllm
