#include "mooncake_vllm/request_planner.h"

#include <algorithm>

namespace mooncake_vllm {

std::vector<Request> coalesce_adjacent(const std::vector<Request>& requests) {
  std::vector<Request> out;
  out.reserve(requests.size());
  for (const Request& r : requests) {
    if (r.length == 0) continue;
    if (!out.empty()) {
      Request& last = out.back();
      if (last.local + last.length == r.local && last.remote + last.length == r.remote) {
        last.length += r.length;
        continue;
      }
    }
    out.push_back(r);
  }
  return out;
}

std::vector<Part> plan_parts(const std::vector<Request>& requests, int lanes, int first_lane,
                             const PlanLimits& limits) {
  uint64_t total = 0;
  for (const Request& r : requests) total += r.length;
  std::vector<Part> parts;
  if (requests.empty()) return parts;
  lanes = std::max(lanes, 1);
  // Target part size: the batch split evenly over the lanes, within the limits.
  uint64_t target = (total + lanes - 1) / lanes;
  target = std::max(target, limits.min_part_bytes);
  target = std::min(target, limits.max_part_bytes);
  target = std::max<uint64_t>(target, 1);

  int lane = first_lane % lanes;
  Part current{lane, {}, 0};
  auto flush = [&] {
    if (current.requests.empty()) return;
    parts.push_back(std::move(current));
    lane = (lane + 1) % lanes;
    current = Part{lane, {}, 0};
  };
  for (Request r : requests) {
    while (r.length > 0) {
      uint64_t room = target - current.bytes;
      uint64_t take = std::min(room, r.length);
      current.requests.push_back({r.local, r.remote, take});
      current.bytes += take;
      r.local += take;
      r.remote += take;
      r.length -= take;
      if (current.bytes >= target || current.requests.size() >= limits.max_part_requests) flush();
    }
  }
  flush();
  return parts;
}

}  // namespace mooncake_vllm
