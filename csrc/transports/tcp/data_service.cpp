#include "data_service.h"

#include <vector>

#include "mooncake_vllm/log.h"
#include "transports/common/frames.h"
#include "transports/common/socket_io.h"

namespace mooncake_vllm::tcp {

using namespace net;

namespace {

// Entries are read in chunks and the vector grows only as they arrive: a header announcing
// the maximum count and then nothing costs one chunk, not the whole announced size.
constexpr size_t kEntryChunk = 4096;

std::string recv_entries(int fd, uint32_t count, std::vector<Entry>& entries) {
  entries.clear();
  while (entries.size() < count) {
    size_t take = std::min<size_t>(kEntryChunk, count - entries.size());
    size_t at = entries.size();
    entries.resize(at + take);
    std::string err = recv_bytes(fd, entries.data() + at, take * sizeof(Entry));
    if (!err.empty()) return err;
  }
  return {};
}

}  // namespace

bool serve_data_request(RegionRegistry& registry, int fd, const RequestHeader& req,
                        const std::string& peer) {
  const bool write = static_cast<WireOp>(req.op) == WireOp::kWrite;
  const char* op = write ? "WRITE" : "READ";
  std::vector<Entry> entries;
  std::string err = recv_entries(fd, req.count, entries);
  if (!err.empty()) {
    MV_LOG(kWarn, "closing connection from " << peer << ": " << op << " entries: " << err);
    return false;
  }
  uint64_t sum = 0;
  for (const Entry& e : entries) {
    if (e.length > UINT64_MAX - sum) {
      sum = UINT64_MAX;
      break;
    }
    sum += e.length;
  }
  if (sum != req.total_bytes) {
    MV_LOG(kWarn, "closing connection from " << peer << ": " << op
                                             << " entries do not add up to total_bytes");
    return false;
  }
  std::vector<uint64_t> addrs(entries.size()), lens(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    addrs[i] = entries[i].remote;
    lens[i] = entries[i].length;
  }
  // Bounds check (and READ permission) of every entry before a single byte moves.
  LeaseSet leases;
  std::string error_text =
      registry.acquire_all(addrs.data(), lens.data(), addrs.size(), leases, "remote");
  if (error_text.empty() && !write) error_text = leases.check_remote_read();
  std::vector<iovec> payload;
  if (error_text.empty()) {
    payload.reserve(entries.size());
    for (const Entry& e : entries)
      if (e.length) payload.push_back({reinterpret_cast<void*>(e.remote), e.length});
  } else {
    MV_LOG(kWarn, "refused " << op << " from " << peer << ": " << error_text);
    leases.clear();
  }
  if (write) {
    // The payload lands directly in the destination; a refused one is drained unread.
    err = error_text.empty() ? recv_all(fd, payload.data(), payload.size())
                             : discard_bytes(fd, req.total_bytes);
    leases.clear();
    payload.clear();
    if (!err.empty()) {
      MV_LOG(kWarn, "closing connection from " << peer << ": WRITE payload: " << err);
      return false;
    }
  }
  err = send_response(fd, req.seq, error_text, payload);
  if (!err.empty()) MV_LOG(kWarn, "closing connection from " << peer << ": response: " << err);
  return err.empty();
}

}  // namespace mooncake_vllm::tcp
